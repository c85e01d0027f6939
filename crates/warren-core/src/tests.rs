//! Core state machines driven directly (no protocol): credit, requeue order, dead-letters.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

use crate::*;

async fn broker() -> (tempfile::TempDir, Arc<Broker>) {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), StoreOptions::default()).unwrap();
    (dir, Broker::open(store, BrokerConfig::default()).unwrap())
}

fn msg(body: &'static str) -> Arc<Message> {
    Arc::new(Message::new(
        "".into(),
        "q".into(),
        Properties::default(),
        Bytes::from_static(body.as_bytes()),
    ))
}

async fn queue(v: &VHost, name: &str, args: FieldTable) -> Arc<Queue> {
    let d = QueueDecl {
        name: name.into(),
        passive: false,
        durable: false,
        exclusive: false,
        auto_delete: false,
        arguments: args,
    };
    v.declare_queue(d, ConnectionId(1)).await.unwrap().0
}

fn consumer(outbox: &Arc<Outbox>, prefetch: u32) -> ConsumerSpec {
    ConsumerSpec {
        id: ConsumerId::next(),
        tag: "c".into(),
        token: 0,
        owner: ConnectionId(1),
        no_ack: false,
        exclusive: false,
        priority: 0,
        prefetch,
        channel_credit: Arc::new(Credit::default()),
        outbox: outbox.clone(),
        stream_start: None,
        arguments: Default::default(),
    }
}

#[tokio::test]
async fn prefetch_bounds_deliveries_and_acks_release_credit() {
    let (_d, b) = broker().await;
    let v = b.vhost("/").unwrap();
    let q = queue(&v, "q", FieldTable::default()).await;
    for body in ["a", "b", "c", "d"] {
        v.publish("", msg(body)).await.unwrap();
    }
    let (outbox, mut rx) = Outbox::new(16);
    q.add_consumer(consumer(&outbox, 2)).await.unwrap();
    let d1 = rx.try_recv().unwrap();
    let d2 = rx.try_recv().unwrap();
    assert!(rx.try_recv().is_err(), "prefetch 2");
    assert_eq!(
        (&d1.message.body[..], &d2.message.body[..]),
        (&b"a"[..], &b"b"[..])
    );
    q.ack(&[d1.seq]).await;
    assert_eq!(&rx.try_recv().unwrap().message.body[..], b"c");
    // Requeue b: it goes back before d, redelivered.
    q.requeue(&[d2.seq]).await;
    let again = rx.try_recv().unwrap();
    assert_eq!(
        (&again.message.body[..], again.redelivered),
        (&b"b"[..], true)
    );
    assert_eq!(q.counts().unacked, 2);
}

#[tokio::test]
async fn full_outbox_stalls_then_resumes_without_loss() {
    let (_d, b) = broker().await;
    let v = b.vhost("/").unwrap();
    let q = queue(&v, "q", FieldTable::default()).await;
    let (outbox, mut rx) = Outbox::new(2);
    q.add_consumer(consumer(&outbox, 0)).await.unwrap();
    for body in ["1", "2", "3", "4", "5"] {
        v.publish("", msg(body)).await.unwrap();
    }
    let mut got = Vec::new();
    while got.len() < 5 {
        while let Ok(d) = rx.try_recv() {
            got.push(String::from_utf8(d.message.body.to_vec()).unwrap());
        }
        for ev in outbox.take_events() {
            if let OutboxEvent::Stalled(w) = ev {
                w.upgrade().unwrap().resume(&outbox).await;
            }
        }
    }
    assert_eq!(got, ["1", "2", "3", "4", "5"]);
}

#[tokio::test]
async fn reject_publish_and_drop_head_dead_letter_with_maxlen() {
    let (_d, b) = broker().await;
    let v = b.vhost("/").unwrap();
    let dead = queue(&v, "dead", FieldTable::default()).await;
    let mut args = FieldTable::default();
    args.insert("x-max-length".into(), AMQPValue::LongInt(1));
    args.insert(
        "x-dead-letter-exchange".into(),
        AMQPValue::LongString("".into()),
    );
    args.insert(
        "x-dead-letter-routing-key".into(),
        AMQPValue::LongString("dead".into()),
    );
    let q = queue(&v, "q", args).await;
    v.publish("", msg("old")).await.unwrap();
    v.publish("", msg("new")).await.unwrap();
    assert_eq!(q.message_count(), 1);
    let d = dead.get(true).await.expect("dead-lettered head");
    assert_eq!(&d.message.body[..], b"old");
    let h = d.message.properties.headers.as_ref().unwrap();
    assert!(h.contains_key("x-death"));
}

#[tokio::test]
async fn queue_ttl_expires_without_consumers() {
    let (_d, b) = broker().await;
    let v = b.vhost("/").unwrap();
    let mut args = FieldTable::default();
    args.insert("x-message-ttl".into(), AMQPValue::LongInt(30));
    let q = queue(&v, "q", args).await;
    v.publish("", msg("x")).await.unwrap();
    assert_eq!(q.message_count(), 1);
    tokio::time::sleep(Duration::from_millis(150)).await;
    assert_eq!(q.message_count(), 0);
}

#[tokio::test]
async fn x_expires_deletes_an_unused_queue() {
    let (_d, b) = broker().await;
    let v = b.vhost("/").unwrap();
    let mut args = FieldTable::default();
    args.insert("x-expires".into(), AMQPValue::LongInt(50));
    queue(&v, "q", args).await;
    assert!(v.queue("q").is_ok());
    tokio::time::sleep(Duration::from_millis(250)).await;
    assert!(v.queue("q").is_err());
}

#[tokio::test]
async fn invalid_arguments_are_406() {
    let (_d, b) = broker().await;
    let v = b.vhost("/").unwrap();
    let mut args = FieldTable::default();
    args.insert("x-message-ttl".into(), AMQPValue::LongInt(-1));
    let d = QueueDecl {
        name: "bad".into(),
        passive: false,
        durable: false,
        exclusive: false,
        auto_delete: false,
        arguments: args,
    };
    let e = v.declare_queue(d, ConnectionId(1)).await.unwrap_err();
    assert_eq!(e.kind, ErrorKind::PreconditionFailed);
}

#[tokio::test]
async fn guest_only_from_loopback() {
    let (_d, b) = broker().await;
    let local: std::net::IpAddr = "127.0.0.1".parse().unwrap();
    let mapped: std::net::IpAddr = "::ffff:127.0.0.1".parse().unwrap();
    let remote: std::net::IpAddr = "10.1.2.3".parse().unwrap();
    assert!(b.authenticate("guest", "guest", local).is_ok());
    assert!(b.authenticate("guest", "guest", mapped).is_ok());
    assert_eq!(
        b.authenticate("guest", "guest", remote).unwrap_err(),
        crate::auth::AuthError::LoopbackOnly("guest".into())
    );
    assert!(b.authenticate("guest", "nope", local).is_err());
    b.put_user("alice", "s3cret", vec![]).await.unwrap();
    assert!(
        b.authenticate("alice", "s3cret", remote).is_ok(),
        "only listed users are loopback-only"
    );
}

#[tokio::test]
async fn certificate_login_needs_an_existing_user_and_keeps_loopback_rules() {
    let (_d, b) = broker().await;
    let local: std::net::IpAddr = "127.0.0.1".parse().unwrap();
    let remote: std::net::IpAddr = "10.1.2.3".parse().unwrap();
    b.put_user("alice", "s3cret", vec![]).await.unwrap();
    assert_eq!(
        b.authenticate_external("alice", remote).unwrap().name,
        "alice"
    );
    assert_eq!(
        b.authenticate_external("mallory", local).unwrap_err(),
        crate::auth::AuthError::InvalidCredentials("mallory".into())
    );
    assert!(b.authenticate_external("guest", local).is_ok());
    assert_eq!(
        b.authenticate_external("guest", remote).unwrap_err(),
        crate::auth::AuthError::LoopbackOnly("guest".into())
    );
}

#[tokio::test]
async fn ttl_zero_reaches_a_ready_consumer_and_expires_otherwise() {
    let (_d, b) = broker().await;
    let v = b.vhost("/").unwrap();
    let mut args = FieldTable::default();
    args.insert("x-message-ttl".into(), AMQPValue::LongInt(0));
    let q = queue(&v, "q", args).await;
    v.publish("", msg("nobody-waiting")).await.unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(q.message_count(), 0, "expired without a consumer");
    let (outbox, mut rx) = Outbox::new(4);
    q.add_consumer(consumer(&outbox, 0)).await.unwrap();
    v.publish("", msg("taken")).await.unwrap();
    assert_eq!(
        &rx.try_recv().expect("delivered at once").message.body[..],
        b"taken"
    );
}
