//! A long backlog of a durable queue is paged out to the store (not kept in memory) and
//! read back in order: by consumers, by basic.get, after a restart, mixed with transient
//! messages, and purged.

mod common;

use common::TestBroker;
use futures_lite::StreamExt;
use lapin::options::*;
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel};

/// Above the in-memory threshold (16,384 messages) by a few chunks.
const N: u64 = 30_000;

fn counts(b: &TestBroker, queue: &str) -> warren_core::QueueCounts {
    let server = b.server.as_ref().expect("running");
    server
        .broker
        .vhost("/")
        .expect("vhost /")
        .queue(queue)
        .expect("queue")
        .counts()
}

/// Publishes ids `from..to` (8-byte big-endian bodies), persistent or not.
async fn publish_ids(ch: &Channel, queue: &str, from: u64, to: u64, persistent: bool) {
    let props = if persistent {
        BasicProperties::default().with_delivery_mode(2)
    } else {
        BasicProperties::default()
    };
    for i in from..to {
        ch.basic_publish(
            "".into(),
            queue.into(),
            BasicPublishOptions::default(),
            &i.to_be_bytes(),
            props.clone(),
        )
        .await
        .expect("publish");
    }
}

fn id_of(body: &[u8]) -> u64 {
    u64::from_be_bytes(body.try_into().expect("8-byte body"))
}

/// Consumes `n` messages with acks and returns their ids in delivery order.
async fn consume_ids(ch: &Channel, queue: &str, n: u64) -> Vec<u64> {
    ch.basic_qos(500, BasicQosOptions::default())
        .await
        .expect("qos");
    let mut consumer = ch
        .basic_consume(
            queue.into(),
            "pager".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("consume");
    let mut ids = Vec::with_capacity(n as usize);
    while (ids.len() as u64) < n {
        let d = tokio::time::timeout(std::time::Duration::from_secs(10), consumer.next())
            .await
            .unwrap_or_else(|_| panic!("stalled after {} of {n}", ids.len()))
            .expect("stream open")
            .expect("delivery");
        ids.push(id_of(&d.data));
        d.ack(BasicAckOptions::default()).await.expect("ack");
    }
    ids
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_backlog_is_paged_out_and_survives_a_restart_in_order() {
    let b = common::start().await;
    let (c, ch) = b.channel().await;
    common::declare_durable(&ch, "backlog").await;
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirm.select");
    publish_ids(&ch, "backlog", 0, N, true).await;
    ch.wait_for_confirms().await.expect("confirms");
    // Transient messages behind them are paged out too, and gone after a restart.
    publish_ids(&ch, "backlog", N, N + 2_000, false).await;
    ch.wait_for_confirms().await.expect("confirms");
    let before = counts(&b, "backlog");
    assert_eq!(before.ready as u64, N + 2_000);
    assert!(
        before.paged_out as u64 >= N + 2_000 - 16_384,
        "paged out: {}",
        before.paged_out
    );
    c.close(200, "bye".into()).await.expect("close");

    let b = b.restart().await;
    let after = counts(&b, "backlog");
    assert_eq!(after.ready as u64, N, "transient messages do not survive");
    assert!(after.paged_out > 0, "recovery pages out too");
    let (_c, ch) = b.channel().await;
    let ids = consume_ids(&ch, "backlog", N).await;
    assert_eq!(ids, (0..N).collect::<Vec<_>>());
    let end = counts(&b, "backlog");
    assert_eq!((end.ready, end.paged_out), (0, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_drains_a_paged_backlog_right_after_publishing() {
    let b = common::start().await;
    let (_c, ch) = b.channel().await;
    common::declare_durable(&ch, "gets").await;
    // Transient: their writes are submitted by the enqueue itself, so the first gets race
    // them to the store.
    publish_ids(&ch, "gets", 0, N, false).await;
    let mut got = Vec::with_capacity(N as usize);
    loop {
        let m = ch
            .basic_get("gets".into(), BasicGetOptions { no_ack: true })
            .await
            .expect("basic.get");
        match m {
            Some(m) => got.push(id_of(&m.delivery.data)),
            None if (got.len() as u64) < N => {
                // Publishes may still be in flight on the connection: poll a little.
                tokio::time::sleep(std::time::Duration::from_millis(5)).await;
                if counts(&b, "gets").ready == 0 {
                    break;
                }
            }
            None => break,
        }
    }
    assert_eq!(got, (0..N).collect::<Vec<_>>());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_keeps_up_with_a_paged_queue_while_it_grows() {
    let b = common::start().await;
    let (_c, ch) = b.channel().await;
    common::declare_durable(&ch, "grow").await;
    publish_ids(&ch, "grow", 0, N, true).await;
    let (_c2, ch2) = b.channel().await;
    let consumer = tokio::spawn(async move { consume_ids(&ch2, "grow", 2 * N).await });
    publish_ids(&ch, "grow", N, 2 * N, true).await;
    let ids = consumer.await.expect("consumer");
    assert_eq!(ids, (0..2 * N).collect::<Vec<_>>());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn purging_a_paged_queue_removes_the_stored_backlog() {
    let b = common::start().await;
    let (c, ch) = b.channel().await;
    common::declare_durable(&ch, "purged").await;
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirm.select");
    publish_ids(&ch, "purged", 0, N, true).await;
    ch.wait_for_confirms().await.expect("confirms");
    assert!(counts(&b, "purged").paged_out > 0);
    let n = ch
        .queue_purge("purged".into(), QueuePurgeOptions::default())
        .await
        .expect("purge");
    assert_eq!(n as u64, N);
    assert_eq!(counts(&b, "purged").paged_out, 0);
    c.close(200, "bye".into()).await.expect("close");
    let b = b.restart().await;
    assert_eq!(counts(&b, "purged").ready, 0, "nothing comes back");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_publishers_keep_their_order_through_paging() {
    // Two connections publish into one queue past the paging threshold at the same time:
    // sequence numbers and enqueue order interleave, which is what chunk runs are for.
    let b = common::start().await;
    let (_c, ch) = b.channel().await;
    common::declare_durable(&ch, "raced").await;
    let per = N / 2;
    let mut publishers = Vec::new();
    for p in 0..2u64 {
        let (c, ch) = b.channel().await;
        publishers.push(tokio::spawn(async move {
            // Publisher p sends p*1e9 + 0.. so each one's own order can be checked.
            ch.confirm_select(ConfirmSelectOptions::default())
                .await
                .expect("confirm.select");
            publish_ids(
                &ch,
                "raced",
                p * 1_000_000_000,
                p * 1_000_000_000 + per,
                true,
            )
            .await;
            ch.wait_for_confirms().await.expect("confirms");
            c
        }));
    }
    let mut keep = Vec::new();
    for p in publishers {
        keep.push(p.await.expect("publisher"));
    }
    assert!(counts(&b, "raced").paged_out > 0);
    let ids = consume_ids(&ch, "raced", 2 * per).await;
    let mut seen = std::collections::HashSet::new();
    let mut next = [0u64; 2];
    for id in ids {
        assert!(seen.insert(id), "{id} delivered twice");
        let (p, k) = ((id / 1_000_000_000) as usize, id % 1_000_000_000);
        assert_eq!(k, next[p], "publisher {p} out of order");
        next[p] += 1;
    }
    assert_eq!(next, [per, per]);
    assert_eq!(counts(&b, "raced").ready, 0);
}
