//! MQTT PUBLISH decoding (framing + mqtt5-protocol) and encoding, 3.1.1 and 5.0.
use bytes::{Bytes, BytesMut};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use mqtt5_protocol::packet::publish::PublishPacket;
use mqtt5_protocol::QoS;
use warren_mqtt::codec::{decode, encode, encode_publish};

/// A way to append a PUBLISH to a buffer.
type Encoder = fn(&PublishPacket, &mut BytesMut);

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("mqtt");
    g.throughput(Throughput::Elements(100));
    for version in [4u8, 5] {
        let payload = Bytes::from_static(b"0123456789abcdef");
        let p = if version == 5 {
            PublishPacket::new("sensors/room1/temp", payload.clone(), QoS::AtLeastOnce)
        } else {
            PublishPacket::new_v311("sensors/room1/temp", payload.clone(), QoS::AtLeastOnce)
        }
        .with_packet_id(7);
        let mut wire = BytesMut::new();
        for _ in 0..100 {
            encode(&p, &mut wire);
        }
        let wire = wire.freeze();
        g.bench_function(format!("decode 100 PUBLISH v{version}"), |b| {
            b.iter(|| {
                let mut buf = BytesMut::from(&wire[..]);
                while let Ok(Some(p)) = decode(&mut buf, version, 1 << 20) {
                    std::hint::black_box(p);
                }
            })
        });
        // mqtt5-protocol's encoder (through the reused body buffer), then the direct one
        // every delivery takes.
        let encoders: [(&str, Encoder); 2] = [
            ("encode", |p, out| encode(p, out)),
            ("encode_publish", |p, out| {
                encode_publish(p, out);
            }),
        ];
        for (name, encoder) in encoders {
            g.bench_function(format!("{name} 100 PUBLISH v{version}"), |b| {
                let mut out = BytesMut::with_capacity(16 * 1024);
                b.iter(|| {
                    out.clear();
                    for _ in 0..100 {
                        encoder(&p, &mut out);
                    }
                    std::hint::black_box(&out);
                })
            });
        }
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
