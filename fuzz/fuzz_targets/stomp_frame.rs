//! Feeds arbitrary bytes to the STOMP frame decoder, whole and split at a fuzzed point,
//! with small limits: it must never panic, and the split input must decode to the same
//! frames (and the same error, if any) as the whole one.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use warren_stomp_codec::{decode, Decoded, Limits, Version};

fn run(chunks: &[&[u8]], version: Version) -> (Vec<Decoded>, bool) {
    let limits = Limits {
        max_frame: 2048,
        max_headers: 16,
        max_header_len: 256,
    };
    let mut buf = BytesMut::new();
    let mut out = Vec::new();
    for c in chunks {
        buf.extend_from_slice(c);
        loop {
            match decode(&mut buf, version, &limits) {
                Ok(Some(d)) => out.push(d),
                Ok(None) => break,
                Err(_) => return (out, true),
            }
        }
    }
    (out, false)
}

fuzz_target!(|data: &[u8]| {
    let Some((&split, rest)) = data.split_first() else { return };
    let version = match split % 3 {
        0 => Version::V1_0,
        1 => Version::V1_1,
        _ => Version::V1_2,
    };
    let at = (split as usize / 3).min(rest.len());
    let whole = run(&[rest], version);
    let parts = run(&[&rest[..at], &rest[at..]], version);
    assert_eq!(whole, parts);
});
