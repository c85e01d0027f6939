//! The core's hot paths: topic-trie matching with 100k bindings, and a message's trip
//! through a queue (publish → enqueue → get → ack) on a broker with a real store.
use std::sync::Arc;

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use warren_core::topic::TopicTrie;
use warren_core::{Broker, BrokerConfig, FieldTable, Message, Properties, QueueDecl};

fn trie(c: &mut Criterion) {
    let mut t = TopicTrie::default();
    for i in 0..100_000u32 {
        t.insert(&format!("dev.{i}.*"), i);
    }
    t.insert("dev.#", u32::MAX);
    t.insert("*.*.temp", u32::MAX - 1);
    let mut g = c.benchmark_group("topic trie (100k bindings)");
    g.throughput(Throughput::Elements(1));
    let mut out = Vec::new();
    g.bench_function("match dev.<n>.temp (3 matches)", |b| {
        let mut n = 0u32;
        b.iter(|| {
            out.clear();
            n = (n + 7919) % 100_000;
            t.matches(&format!("dev.{n}.temp"), &mut out);
            std::hint::black_box(&out);
        })
    });
    g.bench_function("match a miss", |b| {
        b.iter(|| {
            out.clear();
            t.matches("other.thing.here", &mut out);
            std::hint::black_box(&out);
        })
    });
    g.finish();
}

fn queue(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let dir = tempfile::tempdir().expect("tempdir");
    let store = warren_core::Store::open(dir.path(), warren_core::StoreOptions { sync: false })
        .expect("store");
    let broker = Broker::open(store, BrokerConfig::default()).expect("broker");
    let vhost = broker.vhost("/").expect("default vhost");
    let conn = warren_core::ConnectionId::next();
    let (q, _) = rt
        .block_on(vhost.declare_queue(
            QueueDecl {
                name: "bench".into(),
                passive: false,
                durable: false,
                exclusive: false,
                auto_delete: false,
                arguments: FieldTable::default(),
            },
            conn,
        ))
        .expect("declare");
    let msg = Arc::new(Message::new(
        "".into(),
        "bench".into(),
        Properties::default(),
        Bytes::from_static(b"0123456789abcdef"),
    ));
    let mut g = c.benchmark_group("queue");
    g.throughput(Throughput::Elements(1));
    g.bench_function("publish + get + ack (transient)", |b| {
        b.iter(|| {
            rt.block_on(async {
                vhost.publish("", msg.clone()).await.expect("publish");
                let got = q.get(false).await.expect("a message");
                q.ack(&[got.seq]).await;
            })
        })
    });
    g.finish();
}

criterion_group!(benches, trie, queue);
criterion_main!(benches);
