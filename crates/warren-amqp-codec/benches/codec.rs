//! AMQP frame decoding of publishes (method + header + body) and content encoding.
use amq_protocol::protocol::basic;
use bytes::BytesMut;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use warren_amqp_codec::{
    decode_frame, encode_content, encode_content_preencoded, encode_method, encode_properties,
    AMQPClass, BasicProperties,
};

fn bench(c: &mut Criterion) {
    let publish = AMQPClass::Basic(basic::AMQPMethod::Publish(basic::Publish {
        exchange: "".into(),
        routing_key: "work".into(),
        mandatory: false,
        immediate: false,
    }));
    let props = BasicProperties::default().with_delivery_mode(2);
    let mut wire = BytesMut::new();
    for _ in 0..100 {
        encode_method(&mut wire, 1, &publish);
        encode_content(&mut wire, 1, &props, b"0123456789abcdef", 131_072);
    }
    let wire = wire.freeze();
    let mut g = c.benchmark_group("amqp");
    g.throughput(Throughput::Elements(100));
    g.bench_function("decode 100 publishes (3 frames each)", |b| {
        b.iter(|| {
            let mut buf = BytesMut::from(&wire[..]);
            while let Ok(Some(f)) = decode_frame(&mut buf, 131_072) {
                std::hint::black_box(f);
            }
        })
    });
    // The method frames alone: basic.publish takes the hand-written decoder.
    let mut methods = BytesMut::new();
    for _ in 0..100 {
        encode_method(&mut methods, 1, &publish);
    }
    let methods = methods.freeze();
    g.bench_function("decode 100 basic.publish methods", |b| {
        b.iter(|| {
            let mut buf = BytesMut::from(&methods[..]);
            while let Ok(Some(f)) = decode_frame(&mut buf, 131_072) {
                std::hint::black_box(f);
            }
        })
    });
    let encoded = encode_properties(&props);
    g.bench_function("encode 100 contents (pre-encoded properties)", |b| {
        let mut out = BytesMut::with_capacity(64 * 1024);
        b.iter(|| {
            out.clear();
            for _ in 0..100 {
                encode_content_preencoded(&mut out, 1, &encoded, b"0123456789abcdef", 131_072);
            }
            std::hint::black_box(&out);
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
