//! AMQP 0-9-1 features end to end with lapin against an in-process Warren.

mod common;

use std::time::Duration;

use common::*;
use lapin::options::*;
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{BasicProperties, ExchangeKind};

fn s(v: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(v.as_bytes()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_consume_ack() {
    let b = start().await;
    let (_conn, ch) = b.channel().await;
    declare(&ch, "work", FieldTable::default()).await;
    let mut consumer = ch
        .basic_consume(
            "work".into(),
            "c1".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    for i in 0..100u32 {
        publish_with(
            &ch,
            "",
            "work",
            format!("m{i}").as_bytes(),
            BasicProperties::default()
                .with_message_id(format!("id{i}").into())
                .with_content_type("text/plain".into()),
        )
        .await;
    }
    for i in 0..100u32 {
        let d = next(&mut consumer).await;
        assert_eq!(d.data, format!("m{i}").as_bytes());
        assert_eq!(
            d.properties
                .message_id()
                .as_ref()
                .map(|s| s.as_str().to_owned()),
            Some(format!("id{i}"))
        );
        assert_eq!(
            d.properties.content_type().as_ref().map(|s| s.as_str()),
            Some("text/plain")
        );
        assert!(!d.redelivered);
        d.ack(BasicAckOptions::default()).await.unwrap();
    }
    let q = passive(&ch, "work").await;
    assert_eq!(q.message_count(), 0);
    assert_eq!(q.consumer_count(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_bodies_cross_frame_boundaries() {
    let b = start().await;
    let (_c, ch) = b.channel().await;
    declare(&ch, "big", FieldTable::default()).await;
    let body: Vec<u8> = (0..1_000_000u32).map(|i| (i % 251) as u8).collect();
    publish(&ch, "", "big", &body).await;
    publish(&ch, "", "big", b"").await;
    assert_eq!(get(&ch, "big").await.unwrap(), body);
    assert_eq!(get(&ch, "big").await.unwrap(), b"");
    assert_eq!(get(&ch, "big").await, None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prefetch_limits_unacked_and_nack_requeues_with_redelivered() {
    let b = start().await;
    let (_c, ch) = b.channel().await;
    declare(&ch, "pf", FieldTable::default()).await;
    for i in 0..10 {
        publish(&ch, "", "pf", format!("{i}").as_bytes()).await;
    }
    ch.basic_qos(3, BasicQosOptions::default()).await.unwrap();
    let mut consumer = ch
        .basic_consume(
            "pf".into(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let mut got = Vec::new();
    for _ in 0..3 {
        got.push(next(&mut consumer).await);
    }
    nothing_within(&mut consumer, 300).await;
    // Nack the first with requeue: it comes back, redelivered.
    got[0]
        .nack(BasicNackOptions {
            requeue: true,
            multiple: false,
        })
        .await
        .unwrap();
    let again = next(&mut consumer).await;
    assert!(again.redelivered);
    assert_eq!(again.data, got[0].data);
    again.ack(BasicAckOptions::default()).await.unwrap();
    got[2]
        .ack(BasicAckOptions { multiple: true })
        .await
        .unwrap();
    let mut rest = Vec::new();
    for _ in 0..7 {
        let d = next(&mut consumer).await;
        rest.push(String::from_utf8(d.data.clone()).unwrap());
        d.ack(BasicAckOptions::default()).await.unwrap();
    }
    assert_eq!(rest, ["3", "4", "5", "6", "7", "8", "9"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_robin_between_consumers() {
    let b = start().await;
    let (_c, ch) = b.channel().await;
    let ch2 = _c.create_channel().await.unwrap();
    declare(&ch, "rr", FieldTable::default()).await;
    let mut a = ch
        .basic_consume(
            "rr".into(),
            "a".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    let mut bb = ch2
        .basic_consume(
            "rr".into(),
            "b".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    for i in 0..10 {
        publish(&ch, "", "rr", format!("{i}").as_bytes()).await;
    }
    for _ in 0..5 {
        next(&mut a).await;
        next(&mut bb).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reject_dead_letters_with_x_death() {
    let b = start().await;
    let (_c, ch) = b.channel().await;
    ch.exchange_declare(
        "dlx".into(),
        ExchangeKind::Fanout,
        ExchangeDeclareOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    declare(&ch, "dead", FieldTable::default()).await;
    ch.queue_bind(
        "dead".into(),
        "dlx".into(),
        "".into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    declare(&ch, "src", table(&[("x-dead-letter-exchange", s("dlx"))])).await;
    publish(&ch, "", "src", b"bad").await;
    let m = ch
        .basic_get("src".into(), BasicGetOptions::default())
        .await
        .unwrap()
        .unwrap();
    m.delivery
        .reject(BasicRejectOptions { requeue: false })
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let d = ch
        .basic_get("dead".into(), BasicGetOptions { no_ack: true })
        .await
        .unwrap()
        .expect("dead-lettered");
    let headers = d.delivery.properties.headers().clone().expect("headers");
    let Some(AMQPValue::FieldArray(deaths)) = headers.inner().get("x-death") else {
        panic!("no x-death")
    };
    let AMQPValue::FieldTable(first) = &deaths.as_slice()[0] else {
        panic!()
    };
    assert_eq!(first.inner().get("reason"), Some(&s("rejected")));
    assert_eq!(first.inner().get("queue"), Some(&s("src")));
    assert_eq!(first.inner().get("count"), Some(&AMQPValue::LongLongInt(1)));
    assert_eq!(first.inner().get("exchange"), Some(&s("")));
    assert_eq!(
        headers.inner().get("x-first-death-reason"),
        Some(&s("rejected"))
    );
    assert_eq!(d.delivery.exchange.as_str(), "dlx");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ttl_expiry_dead_letters_and_per_message_expiration() {
    let b = start().await;
    let (_c, ch) = b.channel().await;
    declare(&ch, "expired", FieldTable::default()).await;
    declare(
        &ch,
        "ttl",
        table(&[
            ("x-message-ttl", AMQPValue::LongInt(100)),
            ("x-dead-letter-exchange", s("")),
            ("x-dead-letter-routing-key", s("expired")),
        ]),
    )
    .await;
    publish(&ch, "", "ttl", b"t1").await;
    declare(&ch, "perm", FieldTable::default()).await;
    publish_with(
        &ch,
        "",
        "perm",
        b"short",
        BasicProperties::default().with_expiration("50".into()),
    )
    .await;
    publish(&ch, "", "perm", b"long").await;
    tokio::time::sleep(Duration::from_millis(400)).await;
    let d = ch
        .basic_get("expired".into(), BasicGetOptions { no_ack: true })
        .await
        .unwrap()
        .expect("expired message dead-lettered");
    assert_eq!(d.delivery.data, b"t1");
    let h = d.delivery.properties.headers().clone().unwrap();
    assert_eq!(h.inner().get("x-first-death-reason"), Some(&s("expired")));
    assert_eq!(get(&ch, "ttl").await, None);
    assert_eq!(get(&ch, "perm").await.unwrap(), b"long");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_length_drop_head_and_reject_publish() {
    let b = start().await;
    let (_c, ch) = b.channel().await;
    declare(&ch, "ml", table(&[("x-max-length", AMQPValue::LongInt(2))])).await;
    for m in ["a", "b", "c"] {
        publish(&ch, "", "ml", m.as_bytes()).await;
    }
    assert_eq!(get(&ch, "ml").await.unwrap(), b"b");
    assert_eq!(get(&ch, "ml").await.unwrap(), b"c");
    declare(
        &ch,
        "rp",
        table(&[
            ("x-max-length", AMQPValue::LongInt(1)),
            ("x-overflow", s("reject-publish")),
        ]),
    )
    .await;
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    let c1 = ch
        .basic_publish(
            "".into(),
            "rp".into(),
            BasicPublishOptions::default(),
            b"1",
            BasicProperties::default(),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    let c2 = ch
        .basic_publish(
            "".into(),
            "rp".into(),
            BasicPublishOptions::default(),
            b"2",
            BasicProperties::default(),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    assert!(c1.is_ack());
    assert!(c2.is_nack());
    assert_eq!(get(&ch, "rp").await.unwrap(), b"1");
    declare(
        &ch,
        "mlb",
        table(&[("x-max-length-bytes", AMQPValue::LongInt(5))]),
    )
    .await;
    publish(&ch, "", "mlb", b"abc").await;
    publish(&ch, "", "mlb", b"def").await;
    assert_eq!(get(&ch, "mlb").await.unwrap(), b"def");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn priority_queue_delivers_highest_first() {
    let b = start().await;
    let (_c, ch) = b.channel().await;
    declare(
        &ch,
        "prio",
        table(&[("x-max-priority", AMQPValue::ShortShortUInt(10))]),
    )
    .await;
    for (body, p) in [
        ("low", 1u8),
        ("high", 9),
        ("mid", 5),
        ("none", 0),
        ("over", 200),
    ] {
        publish_with(
            &ch,
            "",
            "prio",
            body.as_bytes(),
            BasicProperties::default().with_priority(p),
        )
        .await;
    }
    let mut got = Vec::new();
    while let Some(m) = get(&ch, "prio").await {
        got.push(String::from_utf8(m).unwrap());
    }
    assert_eq!(
        got,
        ["over", "high", "mid", "low", "none"],
        "200 is capped at x-max-priority 10"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn declare_errors_like_rabbitmq() {
    let b = start().await;
    let (conn, ch) = b.channel().await;
    let e = ch
        .queue_declare(
            "missing".into(),
            QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap_err();
    assert_eq!(reply_code(&e), Some(404));
    let ch = conn.create_channel().await.unwrap();
    declare(&ch, "eq", FieldTable::default()).await;
    let e = ch
        .queue_declare(
            "eq".into(),
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap_err();
    assert_eq!(reply_code(&e), Some(406));
    let ch = conn.create_channel().await.unwrap();
    ch.queue_declare(
        "excl".into(),
        QueueDeclareOptions {
            exclusive: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .unwrap();
    let (_c2, other) = b.channel().await;
    let e = other
        .queue_declare(
            "excl".into(),
            QueueDeclareOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap_err();
    assert_eq!(reply_code(&e), Some(405));
    let ch = conn.create_channel().await.unwrap();
    let e = ch
        .exchange_declare(
            "amq.custom".into(),
            ExchangeKind::Direct,
            ExchangeDeclareOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap_err();
    assert_eq!(reply_code(&e), Some(403));
    let ch = conn.create_channel().await.unwrap();
    ch.exchange_declare(
        "x1".into(),
        ExchangeKind::Direct,
        ExchangeDeclareOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    let e = ch
        .exchange_declare(
            "x1".into(),
            ExchangeKind::Fanout,
            ExchangeDeclareOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap_err();
    assert_eq!(reply_code(&e), Some(406));
    let ch = conn.create_channel().await.unwrap();
    let e = ch
        .basic_publish(
            "nope".into(),
            "k".into(),
            BasicPublishOptions::default(),
            b"x",
            BasicProperties::default(),
        )
        .await;
    // The 404 arrives asynchronously as channel.close; the next call on the channel fails.
    let _ = e;
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(!channel_open(&ch).await);
    // Server-named queue.
    let ch = conn.create_channel().await.unwrap();
    let q = ch
        .queue_declare(
            "".into(),
            QueueDeclareOptions {
                exclusive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    assert!(
        q.name().as_str().starts_with("amq.gen-"),
        "{}",
        q.name().as_str()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exchange_types_and_e2e_and_alternate() {
    let b = start().await;
    let (_c, ch) = b.channel().await;
    ch.exchange_declare(
        "t".into(),
        ExchangeKind::Topic,
        ExchangeDeclareOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    for (q, k) in [("t_star", "a.*.c"), ("t_hash", "a.#"), ("t_exact", "a.b.c")] {
        declare(&ch, q, FieldTable::default()).await;
        ch.queue_bind(
            q.into(),
            "t".into(),
            k.into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    }
    publish(&ch, "t", "a.b.c", b"1").await;
    publish(&ch, "t", "a.x", b"2").await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(get(&ch, "t_star").await.unwrap(), b"1");
    assert_eq!(get(&ch, "t_exact").await.unwrap(), b"1");
    assert_eq!(get(&ch, "t_hash").await.unwrap(), b"1");
    assert_eq!(get(&ch, "t_hash").await.unwrap(), b"2");
    assert_eq!(get(&ch, "t_star").await, None);

    // headers any/all
    ch.exchange_declare(
        "h".into(),
        ExchangeKind::Headers,
        ExchangeDeclareOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    declare(&ch, "h_all", FieldTable::default()).await;
    declare(&ch, "h_any", FieldTable::default()).await;
    ch.queue_bind(
        "h_all".into(),
        "h".into(),
        "".into(),
        QueueBindOptions::default(),
        table(&[("x-match", s("all")), ("a", s("1")), ("b", s("2"))]),
    )
    .await
    .unwrap();
    ch.queue_bind(
        "h_any".into(),
        "h".into(),
        "".into(),
        QueueBindOptions::default(),
        table(&[("x-match", s("any")), ("a", s("1")), ("b", s("2"))]),
    )
    .await
    .unwrap();
    publish_with(
        &ch,
        "h",
        "",
        b"one",
        BasicProperties::default().with_headers(table(&[("a", s("1"))])),
    )
    .await;
    publish_with(
        &ch,
        "h",
        "",
        b"both",
        BasicProperties::default().with_headers(table(&[("a", s("1")), ("b", s("2"))])),
    )
    .await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(get(&ch, "h_all").await.unwrap(), b"both");
    assert_eq!(get(&ch, "h_all").await, None);
    assert_eq!(get(&ch, "h_any").await.unwrap(), b"one");
    assert_eq!(get(&ch, "h_any").await.unwrap(), b"both");

    // exchange-to-exchange and alternate exchange
    ch.exchange_declare(
        "src".into(),
        ExchangeKind::Direct,
        ExchangeDeclareOptions::default(),
        table(&[("alternate-exchange", s("ae"))]),
    )
    .await
    .unwrap();
    ch.exchange_declare(
        "ae".into(),
        ExchangeKind::Fanout,
        ExchangeDeclareOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    ch.exchange_declare(
        "dst".into(),
        ExchangeKind::Fanout,
        ExchangeDeclareOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    ch.exchange_bind(
        "dst".into(),
        "src".into(),
        "k".into(),
        ExchangeBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    declare(&ch, "via_e2e", FieldTable::default()).await;
    declare(&ch, "via_ae", FieldTable::default()).await;
    ch.queue_bind(
        "via_e2e".into(),
        "dst".into(),
        "".into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    ch.queue_bind(
        "via_ae".into(),
        "ae".into(),
        "".into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    publish(&ch, "src", "k", b"routed").await;
    publish(&ch, "src", "other", b"unrouted").await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(get(&ch, "via_e2e").await.unwrap(), b"routed");
    assert_eq!(get(&ch, "via_ae").await.unwrap(), b"unrouted");
    assert_eq!(get(&ch, "via_e2e").await, None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn confirms_mandatory_return_and_tx() {
    let b = start().await;
    let (_c, ch) = b.channel().await;
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    declare_durable(&ch, "dq").await;
    let mut pending = Vec::new();
    for i in 0..200 {
        pending.push(
            ch.basic_publish(
                "".into(),
                "dq".into(),
                BasicPublishOptions::default(),
                format!("{i}").as_bytes(),
                BasicProperties::default().with_delivery_mode(2),
            )
            .await
            .unwrap(),
        );
    }
    for p in pending {
        assert!(p.await.unwrap().is_ack());
    }
    let c = ch
        .basic_publish(
            "".into(),
            "no-such-queue".into(),
            BasicPublishOptions {
                mandatory: true,
                ..Default::default()
            },
            b"ret",
            BasicProperties::default(),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    assert!(c.is_ack());
    let returned = c.take_message().expect("basic.return");
    assert_eq!(returned.reply_code, 312);
    assert_eq!(returned.delivery.data, b"ret");

    let (_c2, tch) = b.channel().await;
    tch.tx_select().await.unwrap();
    declare(&tch, "txq", FieldTable::default()).await;
    publish(&tch, "", "txq", b"rolled-back").await;
    tch.tx_rollback().await.unwrap();
    publish(&tch, "", "txq", b"committed").await;
    assert_eq!(get(&ch, "txq").await, None, "nothing visible before commit");
    tch.tx_commit().await.unwrap();
    assert_eq!(get(&ch, "txq").await.unwrap(), b"committed");
    assert_eq!(get(&ch, "txq").await, None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_notification_when_queue_deleted_and_recover() {
    let b = start().await;
    let (_c, ch) = b.channel().await;
    declare(&ch, "gone", FieldTable::default()).await;
    let mut consumer = ch
        .basic_consume(
            "gone".into(),
            "watch".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let (_c2, other) = b.channel().await;
    other
        .queue_delete("gone".into(), QueueDeleteOptions::default())
        .await
        .unwrap();
    let end = tokio::time::timeout(
        Duration::from_secs(5),
        futures_lite::StreamExt::next(&mut consumer),
    )
    .await
    .expect("cancel within 5 s");
    assert!(
        end.is_none(),
        "consumer stream ends on server cancel: {end:?}"
    );

    declare(&ch, "rec", FieldTable::default()).await;
    publish(&ch, "", "rec", b"r").await;
    let mut c = ch
        .basic_consume(
            "rec".into(),
            "rc".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let first = next(&mut c).await;
    assert!(!first.redelivered);
    ch.basic_recover(BasicRecoverOptions { requeue: true })
        .await
        .unwrap();
    let again = next(&mut c).await;
    assert!(again.redelivered);
    assert_eq!(again.data, b"r");
}

/// A no-ack consumer on the direct reply-to pseudo-queue.
async fn reply_consumer(ch: &lapin::Channel, tag: &str) -> lapin::Consumer {
    ch.basic_consume(
        "amq.rabbitmq.reply-to".into(),
        tag.into(),
        BasicConsumeOptions {
            no_ack: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn direct_reply_to_rpc() {
    let b = start().await;
    let (_c, client) = b.channel().await;
    let (_s, server) = b.channel().await;
    declare(&server, "rpc", FieldTable::default()).await;
    let mut requests = server
        .basic_consume(
            "rpc".into(),
            "srv".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    let mut replies = reply_consumer(&client, "cli").await;
    publish_with(
        &client,
        "",
        "rpc",
        b"ping",
        BasicProperties::default()
            .with_reply_to("amq.rabbitmq.reply-to".into())
            .with_correlation_id("c1".into()),
    )
    .await;
    let req = next(&mut requests).await;
    let reply_to = req.properties.reply_to().clone().expect("reply_to");
    // RabbitMQ's shape: two padded base64 parts (php-amqp's tests match
    // `amq.rabbitmq.reply-to.%s.%s==`).
    let parts: Vec<&str> = reply_to
        .as_str()
        .strip_prefix("amq.rabbitmq.reply-to.")
        .expect("the reply-to prefix")
        .split('.')
        .collect();
    assert!(
        parts.len() == 2 && parts[1].len() == 24 && parts[1].ends_with("=="),
        "{}",
        reply_to.as_str()
    );
    publish_with(
        &server,
        "",
        reply_to.as_str(),
        b"pong",
        BasicProperties::default().with_correlation_id("c1".into()),
    )
    .await;
    let rep = next(&mut replies).await;
    assert_eq!(rep.data, b"pong");
    // After a cancel the reply consumer can come back (FastStream's request() does this
    // for every call); it gets a new address.
    client
        .basic_cancel("cli".into(), BasicCancelOptions::default())
        .await
        .unwrap();
    let mut replies = reply_consumer(&client, "cli2").await;
    publish_with(
        &client,
        "",
        "rpc",
        b"ping2",
        BasicProperties::default().with_reply_to("amq.rabbitmq.reply-to".into()),
    )
    .await;
    let req = next(&mut requests).await;
    let again = req.properties.reply_to().clone().expect("reply_to");
    assert_ne!(again, reply_to);
    publish(&server, "", again.as_str(), b"pong2").await;
    assert_eq!(next(&mut replies).await.data, b"pong2");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn empty_queue_name_means_the_last_declared_queue() {
    let b = start().await;
    let (conn, ch) = b.channel().await;
    let e = ch
        .queue_purge("".into(), QueuePurgeOptions::default())
        .await
        .unwrap_err();
    assert_eq!(reply_code(&e), Some(404), "{e}");
    let ch = conn.create_channel().await.unwrap();
    declare(&ch, "last", FieldTable::default()).await;
    for _ in 0..3 {
        publish(&ch, "", "last", b"x").await;
    }
    tokio::time::sleep(Duration::from_millis(50)).await;
    let got = ch
        .basic_get("".into(), BasicGetOptions { no_ack: true })
        .await
        .unwrap()
        .expect("a message from the last declared queue");
    assert_eq!(got.delivery.data, b"x");
    assert_eq!(
        ch.queue_purge("".into(), QueuePurgeOptions::default())
            .await
            .unwrap(),
        2
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn single_active_consumer_and_consumer_priority() {
    let b = start().await;
    let (_c, ch) = b.channel().await;
    declare(
        &ch,
        "sac",
        table(&[("x-single-active-consumer", AMQPValue::Boolean(true))]),
    )
    .await;
    let opts = BasicConsumeOptions {
        no_ack: true,
        ..Default::default()
    };
    let mut first = ch
        .basic_consume("sac".into(), "first".into(), opts, FieldTable::default())
        .await
        .unwrap();
    let mut second = ch
        .basic_consume("sac".into(), "second".into(), opts, FieldTable::default())
        .await
        .unwrap();
    for _ in 0..4 {
        publish(&ch, "", "sac", b"x").await;
    }
    for _ in 0..4 {
        next(&mut first).await;
    }
    nothing_within(&mut second, 200).await;
    ch.basic_cancel("first".into(), BasicCancelOptions::default())
        .await
        .unwrap();
    publish(&ch, "", "sac", b"y").await;
    assert_eq!(next(&mut second).await.data, b"y");

    declare(&ch, "cp", FieldTable::default()).await;
    let mut low = ch
        .basic_consume(
            "cp".into(),
            "low".into(),
            opts,
            table(&[("x-priority", AMQPValue::LongInt(1))]),
        )
        .await
        .unwrap();
    let mut high = ch
        .basic_consume(
            "cp".into(),
            "high".into(),
            opts,
            table(&[("x-priority", AMQPValue::LongInt(10))]),
        )
        .await
        .unwrap();
    for _ in 0..5 {
        publish(&ch, "", "cp", b"p").await;
    }
    for _ in 0..5 {
        next(&mut high).await;
    }
    nothing_within(&mut low, 200).await;
}

/// The active consumer cancels while holding an unacked message: as in RabbitMQ, the next
/// consumer is fed only once that message is settled, so a requeue (its channel closing)
/// puts it first; an ack instead lets the rest through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn single_active_consumer_hand_over_after_cancel_keeps_order() {
    let b = start().await;
    let (_c, ch) = b.channel().await;
    for (q, settle_by_close) in [("sac-close", true), ("sac-ack", false)] {
        declare(
            &ch,
            q,
            table(&[("x-single-active-consumer", AMQPValue::Boolean(true))]),
        )
        .await;
        let (_ca, cha) = b.channel().await;
        cha.basic_qos(1, BasicQosOptions::default()).await.unwrap();
        let mut active = cha
            .basic_consume(
                q.into(),
                "active".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .unwrap();
        let mut next_one = ch
            .basic_consume(
                q.into(),
                "next".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .unwrap();
        for m in ["0", "1", "2"] {
            publish(&ch, "", q, m.as_bytes()).await;
        }
        let held = next(&mut active).await;
        assert_eq!(held.data, b"0");
        nothing_within(&mut next_one, 100).await;
        cha.basic_cancel("active".into(), BasicCancelOptions::default())
            .await
            .unwrap();
        nothing_within(&mut next_one, 200).await;
        let expected: &[(&[u8], bool)] = if settle_by_close {
            cha.close(200, "bye".into()).await.unwrap();
            &[(b"0", true), (b"1", false), (b"2", false)]
        } else {
            held.ack(BasicAckOptions::default()).await.unwrap();
            &[(b"1", false), (b"2", false)]
        };
        for (body, redelivered) in expected {
            let d = next(&mut next_one).await;
            assert_eq!(
                (d.data.as_slice(), d.redelivered),
                (*body, *redelivered),
                "{q}"
            );
            d.ack(BasicAckOptions::default()).await.unwrap();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn purge_delete_if_empty_and_unused() {
    let b = start().await;
    let (conn, ch) = b.channel().await;
    declare(&ch, "p", FieldTable::default()).await;
    for _ in 0..5 {
        publish(&ch, "", "p", b"x").await;
    }
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(
        ch.queue_purge("p".into(), QueuePurgeOptions::default())
            .await
            .unwrap(),
        5
    );
    publish(&ch, "", "p", b"x").await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    let e = ch
        .queue_delete(
            "p".into(),
            QueueDeleteOptions {
                if_empty: true,
                ..Default::default()
            },
        )
        .await
        .unwrap_err();
    assert_eq!(reply_code(&e), Some(406));
    let ch = conn.create_channel().await.unwrap();
    assert_eq!(
        ch.queue_delete("p".into(), QueueDeleteOptions::default())
            .await
            .unwrap(),
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_password_is_refused() {
    let b = start().await;
    let url = format!("amqp://guest:wrong@{}/%2f", b.addr);
    let r = lapin::Connection::connect(&url, lapin::ConnectionProperties::default()).await;
    assert!(r.is_err());
    let url = format!("amqp://guest:guest@{}/nosuchvhost", b.addr);
    let r = lapin::Connection::connect(&url, lapin::ConnectionProperties::default()).await;
    assert!(r.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn durable_state_survives_restart() {
    let b = start().await;
    {
        let (conn, ch) = b.channel().await;
        ch.exchange_declare(
            "dx".into(),
            ExchangeKind::Topic,
            ExchangeDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
        ch.queue_declare(
            "dq".into(),
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
        ch.queue_declare(
            "tq".into(),
            QueueDeclareOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
        ch.queue_bind(
            "dq".into(),
            "dx".into(),
            "a.#".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
        ch.confirm_select(ConfirmSelectOptions::default())
            .await
            .unwrap();
        for (i, mode) in [(0, 2u8), (1, 1), (2, 2), (3, 2)] {
            ch.basic_publish(
                "dx".into(),
                "a.b".into(),
                BasicPublishOptions::default(),
                format!("{i}").as_bytes(),
                BasicProperties::default().with_delivery_mode(mode),
            )
            .await
            .unwrap()
            .await
            .unwrap();
        }
        // Deliver (not ack) message 0: it must come back redelivered.
        let m = ch
            .basic_get("dq".into(), BasicGetOptions::default())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(m.delivery.data, b"0");
        // Ack message 2 (after getting 1)... get 1 with no_ack is transient anyway.
        let _ = conn;
    }
    let b = b.restart().await;
    let (_c, ch) = b.channel().await;
    let q = ch
        .queue_declare(
            "dq".into(),
            QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    assert_eq!(q.message_count(), 3, "three persistent messages");
    ch.exchange_declare(
        "dx".into(),
        ExchangeKind::Topic,
        ExchangeDeclareOptions {
            passive: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .unwrap();
    let m = ch
        .basic_get("dq".into(), BasicGetOptions { no_ack: true })
        .await
        .unwrap()
        .unwrap();
    assert_eq!(m.delivery.data, b"0");
    assert!(m.delivery.redelivered, "delivered before the restart");
    let m = ch
        .basic_get("dq".into(), BasicGetOptions { no_ack: true })
        .await
        .unwrap()
        .unwrap();
    assert_eq!(m.delivery.data, b"2");
    assert!(!m.delivery.redelivered);
    // The binding survived.
    publish(&ch, "dx", "a.z", b"after").await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(get(&ch, "dq").await.unwrap(), b"3");
    assert_eq!(get(&ch, "dq").await.unwrap(), b"after");
    let (_c2, ch2) = b.channel().await;
    let e = ch2
        .queue_declare(
            "tq".into(),
            QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap_err();
    assert_eq!(reply_code(&e), Some(404), "non-durable queue is gone");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_alarm_blocks_publishers_until_cleared() {
    use std::sync::atomic::Ordering;
    let b = start().await;
    let limits = b.server.as_ref().unwrap().limits.clone();
    let (pconn, pch) = b.channel().await;
    let (_cconn, cch) = b.channel().await;
    declare(&pch, "alarm", FieldTable::default()).await;
    pch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    let first = pch
        .basic_publish(
            "".into(),
            "alarm".into(),
            BasicPublishOptions::default(),
            b"before",
            BasicProperties::default(),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    assert!(first.is_ack());

    limits.memory_bytes.store(1, Ordering::Relaxed);
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while !pconn.status().blocked() {
        assert!(
            std::time::Instant::now() < deadline,
            "connection.blocked not received"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // lapin itself holds publishes while blocked; the broker must not take them either.
    let mut pending = tokio::spawn(async move {
        pch.basic_publish(
            "".into(),
            "alarm".into(),
            BasicPublishOptions::default(),
            b"during",
            BasicProperties::default(),
        )
        .await
        .unwrap()
        .await
        .unwrap()
    });
    assert!(
        tokio::time::timeout(Duration::from_millis(700), &mut pending)
            .await
            .is_err(),
        "a blocked publisher's message was confirmed"
    );
    assert_eq!(
        cch.queue_declare(
            "alarm".into(),
            QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default()
        )
        .await
        .unwrap()
        .message_count(),
        1
    );
    // Consumers keep working while publishers are blocked.
    assert_eq!(
        cch.basic_get("alarm".into(), BasicGetOptions { no_ack: true })
            .await
            .unwrap()
            .unwrap()
            .delivery
            .data,
        b"before"
    );

    limits.memory_bytes.store(u64::MAX, Ordering::Relaxed);
    let c = tokio::time::timeout(Duration::from_secs(5), pending)
        .await
        .expect("confirm after the alarm cleared")
        .unwrap();
    assert!(c.is_ack());
    assert!(!pconn.status().blocked());
    assert_eq!(get(&cch, "alarm").await.unwrap(), b"during");
}

/// A connection reuses the exchange of its last publish without looking it up again; once
/// that exchange is deleted (here from another connection) and declared anew, publishes
/// reach the new one's bindings, and without a new one they are a 404 as in RabbitMQ.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishing_after_the_exchange_is_deleted() {
    let b = start().await;
    let (_conn, ch) = b.channel().await;
    let (_admin_conn, admin) = b.channel().await;
    /// Declares fanout exchange `x-cached` bound to `queue`.
    async fn fanout_to(ch: &lapin::Channel, queue: &str) {
        ch.exchange_declare(
            "x-cached".into(),
            ExchangeKind::Fanout,
            ExchangeDeclareOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("exchange.declare");
        ch.queue_bind(
            queue.into(),
            "x-cached".into(),
            "".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("bind");
    }
    declare(&admin, "q-old", FieldTable::default()).await;
    declare(&admin, "q-new", FieldTable::default()).await;
    fanout_to(&admin, "q-old").await;
    publish(&ch, "x-cached", "", b"one").await;
    publish(&ch, "x-cached", "", b"two").await;
    // `ch` and `admin` are separate connections: without this wait, the delete below
    // could be processed before "two" arrives, which would then be a 404.
    wait_ready(&admin, "q-old", 2).await;
    admin
        .exchange_delete("x-cached".into(), ExchangeDeleteOptions::default())
        .await
        .expect("exchange.delete");
    fanout_to(&admin, "q-new").await;
    publish(&ch, "x-cached", "", b"three").await;
    wait_ready(&admin, "q-new", 1).await;
    assert_eq!(get(&admin, "q-old").await.as_deref(), Some(&b"one"[..]));
    assert_eq!(get(&admin, "q-old").await.as_deref(), Some(&b"two"[..]));
    assert_eq!(
        get(&admin, "q-old").await,
        None,
        "the old exchange got no more"
    );
    assert_eq!(get(&admin, "q-new").await.as_deref(), Some(&b"three"[..]));
    admin
        .exchange_delete("x-cached".into(), ExchangeDeleteOptions::default())
        .await
        .expect("exchange.delete");
    let _ = ch
        .basic_publish(
            "x-cached".into(),
            "".into(),
            BasicPublishOptions::default(),
            b"four",
            BasicProperties::default(),
        )
        .await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    // The 404 closed the channel (lapin reports the closed state on the next call).
    assert!(!channel_open(&ch).await);
    assert_eq!(
        get(&admin, "q-new").await,
        None,
        "nothing reached the unbound queue"
    );
}

/// RabbitMQ's sender-selected distribution: `CC` and `BCC` keys route like the routing
/// key, through the default exchange and a direct one; `BCC` is removed before delivery,
/// `CC` is kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bcc_routes_blind_copies_and_is_removed() {
    let b = start().await;
    let (_c, ch) = b.channel().await;
    for q in ["to", "cc", "bcc"] {
        declare(&ch, q, FieldTable::default()).await;
    }
    ch.exchange_declare(
        "ssd".into(),
        ExchangeKind::Direct,
        ExchangeDeclareOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    for q in ["to", "cc", "bcc"] {
        ch.queue_bind(
            q.into(),
            "ssd".into(),
            format!("k-{q}").as_str().into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    }
    let keys = |v: &str| AMQPValue::FieldArray(vec![s(v)].into());
    for (exchange, prefix) in [("", ""), ("ssd", "k-")] {
        let headers = table(&[
            ("CC", keys(&format!("{prefix}cc"))),
            ("BCC", keys(&format!("{prefix}bcc"))),
            ("keep", s("me")),
        ]);
        publish_with(
            &ch,
            exchange,
            &format!("{prefix}to"),
            exchange.as_bytes(),
            BasicProperties::default().with_headers(headers),
        )
        .await;
        for q in ["to", "cc", "bcc"] {
            let m = ch
                .basic_get(q.into(), BasicGetOptions { no_ack: true })
                .await
                .unwrap()
                .unwrap_or_else(|| panic!("{q} got no copy through {exchange:?}"));
            assert_eq!(m.delivery.data, exchange.as_bytes());
            assert_eq!(m.delivery.routing_key.as_str(), format!("{prefix}to"));
            let h = m.delivery.properties.headers().clone().unwrap_or_default();
            assert!(h.inner().contains_key("CC"), "CC is kept ({q})");
            assert!(!h.inner().contains_key("BCC"), "BCC is removed ({q})");
            assert_eq!(h.inner().get("keep"), Some(&s("me")));
        }
    }
}

/// A quorum queue counts returns: `x-delivery-count` on redeliveries, and past
/// `x-delivery-limit` the message is dead-lettered with reason `delivery_limit`.
#[tokio::test]
async fn quorum_delivery_limit_dead_letters_poison_messages() {
    let b = start().await;
    let (_c, ch) = b.channel().await;
    declare_durable(&ch, "poison").await;
    let args = table(&[
        ("x-queue-type", s("quorum")),
        ("x-delivery-limit", AMQPValue::LongInt(1)),
        ("x-dead-letter-exchange", s("")),
        ("x-dead-letter-routing-key", s("poison")),
    ]);
    let durable = QueueDeclareOptions {
        durable: true,
        ..Default::default()
    };
    ch.queue_declare("work".into(), durable, args)
        .await
        .unwrap();
    publish(&ch, "", "work", b"bad").await;
    wait_ready(&ch, "work", 1).await;
    let mut counts = Vec::new();
    for _ in 0..5 {
        let Some(m) = ch
            .basic_get("work".into(), BasicGetOptions::default())
            .await
            .unwrap()
        else {
            break;
        };
        let h = m.delivery.properties.headers().clone().unwrap_or_default();
        counts.push(h.inner().get("x-delivery-count").cloned());
        m.delivery
            .nack(BasicNackOptions {
                requeue: true,
                ..Default::default()
            })
            .await
            .unwrap();
    }
    // basic.get shows the count from the first delivery; the limit allows one return.
    let count = |n| Some(AMQPValue::LongLongInt(n));
    assert_eq!(counts, vec![count(0), count(1)]);
    wait_ready(&ch, "poison", 1).await;
    let d = ch
        .basic_get("poison".into(), BasicGetOptions { no_ack: true })
        .await
        .unwrap()
        .expect("dead-lettered");
    let h = d.delivery.properties.headers().clone().unwrap();
    assert_eq!(
        h.inner().get("x-first-death-reason"),
        Some(&s("delivery_limit"))
    );
    assert!(!h.inner().contains_key("x-delivery-count"));
}

/// A delivery left unacknowledged past the consumer timeout closes its channel with
/// RabbitMQ's 406 and goes back to the queue; other channels are untouched.
#[tokio::test]
async fn consumer_timeout_closes_the_channel_and_requeues() {
    let b = start_with(|c| c.amqp.consumer_timeout_ms = 1000).await;
    let conn = b.connect().await;
    let ch = conn.create_channel().await.unwrap();
    let idle = conn.create_channel().await.unwrap();
    declare(&ch, "slow", FieldTable::default()).await;
    publish(&ch, "", "slow", b"m").await;
    wait_ready(&ch, "slow", 1).await;
    let mut consumer = ch
        .basic_consume(
            "slow".into(),
            "c".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let m = next(&mut consumer).await;
    assert!(!m.redelivered);
    // Not acked: within 1–3 s the channel is closed, which ends the consumer.
    use futures_lite::StreamExt;
    let err = match tokio::time::timeout(Duration::from_secs(4), consumer.next()).await {
        Ok(Some(Err(e))) => e,
        other => panic!("the channel outlived the consumer timeout: {other:?}"),
    };
    assert_eq!(reply_code(&err), Some(406), "{err}");
    assert!(
        err.to_string().contains(
            "delivery acknowledgement on channel 1 timed out. Timeout value used: 1000 ms"
        ),
        "{err}"
    );
    assert!(idle.status().connected());
    let again = idle
        .basic_get("slow".into(), BasicGetOptions { no_ack: true })
        .await
        .unwrap()
        .expect("requeued");
    assert!(again.delivery.redelivered);
}

/// A stream queue: every reader starts where `x-stream-offset` says and gets each message
/// with its offset; acks return credit without removing anything; basic.get is refused.
#[tokio::test]
async fn stream_readers_start_at_their_offsets() {
    let b = start().await;
    let (_c, ch) = b.channel().await;
    let durable = QueueDeclareOptions {
        durable: true,
        ..Default::default()
    };
    ch.queue_declare(
        "log".into(),
        durable,
        table(&[("x-queue-type", s("stream"))]),
    )
    .await
    .unwrap();
    for i in 0..5u8 {
        publish(&ch, "", "log", &[b'0' + i]).await;
    }
    ch.basic_qos(2, BasicQosOptions::default()).await.unwrap();
    let offset_of = |d: &lapin::message::Delivery| {
        d.properties
            .headers()
            .as_ref()
            .and_then(|h| h.inner().get("x-stream-offset").cloned())
    };
    for (start, first) in [
        (AMQPValue::LongString("first".into()), 0i64),
        (AMQPValue::LongLongInt(3), 3),
    ] {
        let mut c = ch
            .basic_consume(
                "log".into(),
                format!("from-{first}").as_str().into(),
                BasicConsumeOptions::default(),
                table(&[("x-stream-offset", start)]),
            )
            .await
            .unwrap();
        for want in first..5 {
            let d = next(&mut c).await;
            assert_eq!(offset_of(&d), Some(AMQPValue::LongLongInt(want)));
            assert_eq!(d.data, vec![b'0' + want as u8]);
            d.ack(BasicAckOptions::default()).await.unwrap();
        }
    }
    // Still five messages after every ack.
    assert_eq!(passive(&ch, "log").await.message_count(), 5);
    let err = ch
        .basic_get("log".into(), BasicGetOptions::default())
        .await
        .unwrap_err();
    assert_eq!(reply_code(&err), Some(540), "{err}");
}
