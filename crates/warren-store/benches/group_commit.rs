//! The store's group commit: many concurrent submitters, one synced WriteBatch per group.
use bytes::Bytes;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use warren_store::{Op, Store, StoreOptions, StoreQueueId};

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open(dir.path(), StoreOptions { sync: true }).expect("store");
    let body = Bytes::from(vec![7u8; 128]);
    let mut g = c.benchmark_group("store");
    g.sample_size(10);
    g.throughput(Throughput::Elements(1000));
    let mut seq = 0u64;
    g.bench_function("1000 synced puts from 50 concurrent writers", |b| {
        b.iter(|| {
            rt.block_on(async {
                let mut tasks = Vec::new();
                for w in 0..50u64 {
                    let store = store.clone();
                    let body = body.clone();
                    let base = seq + w * 20;
                    tasks.push(tokio::spawn(async move {
                        for k in 0..20 {
                            let t = store
                                .submit(vec![Op::PutMessage {
                                    queue: StoreQueueId(1),
                                    seq: base + k,
                                    data: body.clone(),
                                }])
                                .await
                                .expect("submit");
                            store.wait_synced(t).await.expect("synced");
                        }
                    }));
                }
                for t in tasks {
                    t.await.expect("writer");
                }
            });
            seq += 1000;
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
