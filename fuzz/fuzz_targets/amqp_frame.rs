//! Feeds arbitrary bytes to the AMQP frame decoder, whole and split at a fuzzed point, with
//! a small frame_max: it must never panic, and the split input must decode to the same
//! frames as the whole one.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use warren_amqp_codec::{decode_frame, decode_protocol_header, Frame};

fn decode(chunks: &[&[u8]]) -> (Vec<Frame>, bool) {
    let mut buf = BytesMut::new();
    let mut frames = Vec::new();
    for c in chunks {
        buf.extend_from_slice(c);
        loop {
            match decode_frame(&mut buf, 4096) {
                Ok(Some(f)) => frames.push(f),
                Ok(None) => break,
                Err(_) => return (frames, true),
            }
        }
    }
    (frames, false)
}

fuzz_target!(|data: &[u8]| {
    let _ = decode_protocol_header(&mut BytesMut::from(data));
    let Some((&split, rest)) = data.split_first() else { return };
    let at = (split as usize).min(rest.len());
    let whole = decode(&[rest]);
    let parts = decode(&[&rest[..at], &rest[at..]]);
    assert_eq!(whole, parts);
});
