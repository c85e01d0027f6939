use super::*;
use proptest::prelude::*;

fn dec(bytes: &[u8], v: Version) -> Result<Option<Decoded>, CodecError> {
    let mut b = BytesMut::from(bytes);
    decode(&mut b, v, &Limits::default())
}

fn frame(bytes: &[u8], v: Version) -> Frame {
    match dec(bytes, v) {
        Ok(Some(Decoded::Frame(f))) => f,
        other => panic!("expected a frame, got {other:?}"),
    }
}

#[test]
fn spec_connect_example() {
    // STOMP 1.2 "Connecting".
    let f = frame(
        b"CONNECT\naccept-version:1.2\nhost:stomp.github.org\n\n\0",
        Version::V1_0,
    );
    assert_eq!(f.command, "CONNECT");
    assert_eq!(f.get("accept-version"), Some("1.2"));
    assert_eq!(f.get("host"), Some("stomp.github.org"));
    assert!(f.body.is_empty());
}

#[test]
fn spec_send_with_body() {
    let f = frame(
        b"SEND\ndestination:/queue/a\ncontent-type:text/plain\n\nhello queue a\0",
        Version::V1_2,
    );
    assert_eq!(f.command, "SEND");
    assert_eq!(&f.body[..], b"hello queue a");
}

#[test]
fn content_length_body_may_hold_nul() {
    let f = frame(
        b"SEND\ndestination:/queue/a\ncontent-length:5\n\na\0b\0c\0",
        Version::V1_2,
    );
    assert_eq!(&f.body[..], b"a\0b\0c");
}

#[test]
fn content_length_without_trailing_nul_is_malformed() {
    assert!(matches!(
        dec(b"SEND\ncontent-length:2\n\nabc\0", Version::V1_2),
        Err(CodecError::Malformed(_))
    ));
}

#[test]
fn crlf_line_endings() {
    let f = frame(
        b"SEND\r\ndestination:/queue/a\r\nx:y\r\n\r\nbody\0",
        Version::V1_2,
    );
    assert_eq!(f.get("destination"), Some("/queue/a"));
    assert_eq!(f.get("x"), Some("y"));
    assert_eq!(&f.body[..], b"body");
}

#[test]
fn repeated_header_first_wins() {
    let f = frame(b"MESSAGE\nfoo:World\nfoo:Hello\n\n\0", Version::V1_2);
    assert_eq!(f.get("foo"), Some("World"));
}

#[test]
fn escapes_in_1_2_but_not_in_connect() {
    let f = frame(b"SEND\na\\cb:c\\nd\\\\e\\rf\n\n\0", Version::V1_2);
    assert_eq!(f.get("a:b"), Some("c\nd\\e\rf"));
    // 1.1 has no \r escape: fatal.
    assert_eq!(
        dec(b"SEND\na:\\r\n\n\0", Version::V1_1),
        Err(CodecError::BadEscape)
    );
    assert_eq!(
        dec(b"SEND\na:\\t\n\n\0", Version::V1_2),
        Err(CodecError::BadEscape)
    );
    // CONNECT never unescapes (its passcode may hold a backslash).
    let f = frame(b"CONNECT\npasscode:a\\b\n\n\0", Version::V1_2);
    assert_eq!(f.get("passcode"), Some("a\\b"));
    // 1.0: no escaping at all.
    let f = frame(b"SEND\na:\\t\n\n\0", Version::V1_0);
    assert_eq!(f.get("a"), Some("\\t"));
}

#[test]
fn decoded_frames_outlive_the_read_buffer() {
    // Two frames in one read: the first keeps its header ranges valid after the second is
    // decoded and the buffer is refilled over the same memory.
    let mut buf = BytesMut::from(
        &b"SEND\ndestination:/queue/a\nk\\c:v\\n\nx:1\nx:2\n\nbody\0MESSAGE\ny:2\n\n\0"[..],
    );
    let l = Limits::default();
    let Ok(Some(Decoded::Frame(first))) = decode(&mut buf, Version::V1_2, &l) else {
        panic!("no first frame");
    };
    let Ok(Some(Decoded::Frame(second))) = decode(&mut buf, Version::V1_2, &l) else {
        panic!("no second frame");
    };
    buf.clear();
    buf.extend_from_slice(&[b'#'; 256]);
    let expected = Frame::new("SEND")
        .with("destination", "/queue/a")
        .with("k:", "v\n")
        .with("x", "1")
        .with("x", "2");
    assert_eq!(
        first.headers().collect::<Vec<_>>(),
        expected.headers().collect::<Vec<_>>()
    );
    assert_eq!(first.command, "SEND");
    assert_eq!(&first.body[..], b"body");
    assert_eq!(second.command, "MESSAGE");
    assert_eq!(second.get("y"), Some("2"));
    // A command outside the protocol still decodes (the session answers it).
    assert_eq!(frame(b"FOO\n\n\0", Version::V1_2).command, "FOO");
}

#[test]
fn colon_in_value_is_kept() {
    let f = frame(b"SEND\nurl:http://x:1/\n\n\0", Version::V1_0);
    assert_eq!(f.get("url"), Some("http://x:1/"));
}

#[test]
fn heart_beats_and_trailing_eols() {
    let mut b = BytesMut::from(&b"\n\r\nSEND\n\n\0\n\n"[..]);
    let l = Limits::default();
    assert_eq!(
        decode(&mut b, Version::V1_2, &l),
        Ok(Some(Decoded::HeartBeat))
    );
    assert_eq!(
        decode(&mut b, Version::V1_2, &l),
        Ok(Some(Decoded::HeartBeat))
    );
    assert!(matches!(
        decode(&mut b, Version::V1_2, &l),
        Ok(Some(Decoded::Frame(_)))
    ));
    assert_eq!(
        decode(&mut b, Version::V1_2, &l),
        Ok(Some(Decoded::HeartBeat))
    );
    assert_eq!(
        decode(&mut b, Version::V1_2, &l),
        Ok(Some(Decoded::HeartBeat))
    );
    assert_eq!(decode(&mut b, Version::V1_2, &l), Ok(None));
}

#[test]
fn a_stray_nul_between_frames_is_skipped() {
    let mut b = BytesMut::from(&b"\0SEND\n\n\0"[..]);
    let l = Limits::default();
    assert_eq!(
        decode(&mut b, Version::V1_2, &l),
        Ok(Some(Decoded::HeartBeat))
    );
    assert!(matches!(
        decode(&mut b, Version::V1_2, &l),
        Ok(Some(Decoded::Frame(f))) if f.command == "SEND"
    ));
}

#[test]
fn stomp_1_0_values_lose_leading_blanks() {
    let f = frame(b"SUBSCRIBE\nid: s1\nreceipt:  r \n\n\0", Version::V1_0);
    assert_eq!(f.get("id"), Some("s1"));
    assert_eq!(f.get("receipt"), Some("r "));
    // STOMP 1.2 "Value Encoding": whitespace is part of the value.
    let f = frame(b"SUBSCRIBE\nid: s1\n\n\0", Version::V1_2);
    assert_eq!(f.get("id"), Some(" s1"));
}

#[test]
fn incomplete_frames_need_more() {
    let whole = b"SEND\ndestination:/queue/a\ncontent-length:3\n\nabc\0";
    for cut in 0..whole.len() {
        assert_eq!(dec(&whole[..cut], Version::V1_2), Ok(None), "cut at {cut}");
    }
    let no_len = b"SEND\ndestination:/queue/a\n\nabc\0";
    for cut in 0..no_len.len() {
        assert_eq!(dec(&no_len[..cut], Version::V1_2), Ok(None), "cut at {cut}");
    }
}

#[test]
fn limits_are_errors() {
    let l = Limits {
        max_frame: 100,
        max_headers: 3,
        max_header_len: 20,
    };
    let run = |bytes: &[u8]| decode(&mut BytesMut::from(bytes), Version::V1_2, &l);
    assert_eq!(
        run(b"SEND\ncontent-length:1000\n\n"),
        Err(CodecError::FrameTooLarge { limit: 100 })
    );
    assert_eq!(
        run(b"SEND\ncontent-length:9x\n\n"),
        Err(CodecError::BadContentLength)
    );
    assert_eq!(
        run(b"SEND\na:1\nb:2\nc:3\nd:4\n\n\0"),
        Err(CodecError::TooManyHeaders { limit: 3 })
    );
    assert_eq!(
        run(b"SEND\naaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"),
        Err(CodecError::HeaderTooLong { limit: 20 })
    );
    // A body without NUL that outgrows the frame limit.
    let mut big = b"SEND\n\n".to_vec();
    big.extend(std::iter::repeat_n(b'x', 200));
    assert_eq!(run(&big), Err(CodecError::FrameTooLarge { limit: 100 }));
}

#[test]
fn garbage_is_malformed() {
    assert!(dec(b"hello world\n\n\0", Version::V1_2).is_err());
    assert!(dec(b"SEND\nnocolon\n\n\0", Version::V1_2).is_err());
    assert!(dec(b"\rX", Version::V1_2).is_err());
}

#[test]
fn encode_escapes_per_version() {
    let f = Frame::new("MESSAGE").with("k:1", "a\nb\r\\");
    let mut out = BytesMut::new();
    encode(&f, Version::V1_2, &mut out);
    assert_eq!(&out[..], b"MESSAGE\nk\\c1:a\\nb\\r\\\\\n\n\0\n");
    out.clear();
    encode(&f, Version::V1_1, &mut out);
    assert_eq!(&out[..], b"MESSAGE\nk\\c1:a\\nb\r\\\\\n\n\0\n");
    out.clear();
    let c = Frame::new("CONNECTED").with("version", "1.2");
    encode(&c, Version::V1_2, &mut out);
    // Every frame ends `\0\n`, as RabbitMQ's (`trailing_lf`).
    assert_eq!(&out[..], b"CONNECTED\nversion:1.2\n\n\0\n");
}

fn arb_frame() -> impl Strategy<Value = Frame> {
    let name = "[a-z][a-z0-9\\-:\\\\\n]{0,12}";
    let value = "[ -~\n\\\\é]{0,24}";
    (
        prop::sample::select(vec!["SEND", "MESSAGE", "SUBSCRIBE", "ACK", "ERROR"]),
        prop::collection::vec((name, value), 0..6),
        prop::collection::vec(any::<u8>(), 0..64),
    )
        .prop_map(|(c, headers, body)| {
            let mut f = Frame::new(c);
            for (k, v) in headers {
                if k != "content-length" {
                    f.push(&k, v);
                }
            }
            f.push("content-length", body.len().to_string());
            f.body = Bytes::from(body);
            f
        })
}

proptest! {
    /// decode ∘ encode is the identity (1.2 escaping), whatever the chunking.
    #[test]
    fn round_trip_in_chunks(frames in prop::collection::vec(arb_frame(), 1..4), chunk in 1usize..40) {
        let mut wire = BytesMut::new();
        for f in &frames {
            encode(f, Version::V1_2, &mut wire);
        }
        let mut buf = BytesMut::new();
        let mut got = Vec::new();
        let l = Limits::default();
        for piece in wire.chunks(chunk) {
            buf.extend_from_slice(piece);
            while let Some(d) = decode(&mut buf, Version::V1_2, &l).unwrap() {
                if let Decoded::Frame(f) = d { got.push(f); }
            }
        }
        prop_assert_eq!(got, frames);
        prop_assert!(buf.is_empty());
    }

    /// Arbitrary bytes never panic and never loop.
    #[test]
    fn arbitrary_bytes(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
        let mut buf = BytesMut::from(&bytes[..]);
        let l = Limits { max_frame: 128, max_headers: 8, max_header_len: 32 };
        for _ in 0..300 {
            match decode(&mut buf, Version::V1_2, &l) {
                Ok(Some(_)) => {}
                _ => break,
            }
        }
    }
}
