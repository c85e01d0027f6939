//! STOMP decode and encode of a typical 16-byte SEND / MESSAGE.
use bytes::{Bytes, BytesMut};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use warren_stomp_codec::{decode, encode, Frame, Limits, Version};

fn bench(c: &mut Criterion) {
    let mut f = Frame::new("SEND")
        .with("destination", "/queue/work")
        .with("content-type", "text/plain")
        .with("content-length", "16");
    f.body = Bytes::from_static(b"0123456789abcdef");
    let mut wire = BytesMut::new();
    for _ in 0..100 {
        encode(&f, Version::V1_2, &mut wire);
    }
    let wire = wire.freeze();
    let mut g = c.benchmark_group("stomp");
    g.throughput(Throughput::Elements(100));
    g.bench_function("decode 100 SEND", |b| {
        b.iter(|| {
            let mut buf = BytesMut::from(&wire[..]);
            let l = Limits::default();
            while let Ok(Some(d)) = decode(&mut buf, Version::V1_2, &l) {
                std::hint::black_box(d);
            }
        })
    });
    let mut m = Frame::new("MESSAGE")
        .with("subscription", "0")
        .with("destination", "/queue/work")
        .with("message-id", "T_0@@session-abc@@42")
        .with("redelivered", "false")
        .with("content-length", "16");
    m.body = Bytes::from_static(b"0123456789abcdef");
    g.bench_function("encode 100 MESSAGE", |b| {
        let mut out = BytesMut::with_capacity(64 * 1024);
        b.iter(|| {
            out.clear();
            for _ in 0..100 {
                encode(&m, Version::V1_2, &mut out);
            }
            std::hint::black_box(&out);
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
