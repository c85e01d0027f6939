//! Feeds arbitrary bytes to the MQTT packet decoder (warren-mqtt's `codec` module) at each
//! protocol level (0 = before CONNECT, 4, 5), whole and split at a fuzzed point, with a
//! small maximum packet size: it must never panic, and the split input must decode to the
//! same packets as the whole one.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;

#[path = "../../crates/warren-mqtt/src/codec.rs"]
#[allow(dead_code)]
mod codec;

fn decode(chunks: &[&[u8]], version: u8) -> (Vec<String>, bool) {
    let mut buf = BytesMut::new();
    let mut packets = Vec::new();
    for c in chunks {
        buf.extend_from_slice(c);
        loop {
            match codec::decode(&mut buf, version, 4096) {
                // The packet type and the length of its Debug form: mqtt5-protocol keeps
                // properties in a HashMap, so the Debug order of properties varies.
                Ok(Some(p)) => packets.push(format!("{} {}", p.packet_type_name(), format!("{p:?}").len())),
                Ok(None) => break,
                Err(_) => return (packets, true),
            }
        }
    }
    (packets, false)
}

fuzz_target!(|data: &[u8]| {
    let Some((&sel, rest)) = data.split_first() else { return };
    let version = [0u8, 4, 5][(sel & 3) as usize % 3];
    let at = ((sel >> 2) as usize * 4).min(rest.len());
    let whole = decode(&[rest], version);
    let parts = decode(&[&rest[..at], &rest[at..]], version);
    assert_eq!(whole, parts);
});
