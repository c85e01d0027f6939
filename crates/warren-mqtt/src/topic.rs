//! MQTT topics ↔ AMQP routing keys on `amq.topic`, the RabbitMQ way: `/` and `.` swap
//! (so a `.` inside an MQTT level survives as `/` in the AMQP word and comes back), `+` ↔
//! `*`, `#` ↔ `#`. docs/mqtt.md has the table.

/// An MQTT topic name or filter as an AMQP routing/binding key.
pub fn to_amqp(topic: &str) -> String {
    let hits = memchr::memchr3_iter(b'/', b'.', b'+', topic.as_bytes());
    swap_ascii(topic, hits, |b| match b {
        b'/' => '.',
        b'.' => '/',
        _ => '*',
    })
}

/// An AMQP routing key as the MQTT topic a subscriber sees (a `*` in a key is a literal
/// character, as in an MQTT topic name).
pub fn to_mqtt(key: &str) -> String {
    let hits = memchr::memchr2_iter(b'.', b'/', key.as_bytes());
    swap_ascii(key, hits, |b| if b == b'.' { '/' } else { '.' })
}

/// An AMQP binding key as the MQTT filter it came from (`*` ↔ `+`).
pub fn filter_to_mqtt(key: &str) -> String {
    let hits = memchr::memchr3_iter(b'.', b'/', b'*', key.as_bytes());
    swap_ascii(key, hits, |b| match b {
        b'.' => '/',
        b'/' => '.',
        _ => '+',
    })
}

/// `s` with the ASCII byte at each of `hits` replaced by `swap` of it, copied in runs
/// between them. Every message is converted once each way, and a `chars().map().collect()`
/// pushed it char by char: ~1,400 instructions for a 27-byte topic (callgrind). A hit is
/// an ASCII byte, so every slice is at a char boundary: no byte of a UTF-8 multi-byte
/// sequence is ASCII.
fn swap_ascii(s: &str, hits: impl Iterator<Item = usize>, swap: impl Fn(u8) -> char) -> String {
    let mut out = String::with_capacity(s.len());
    let mut from = 0;
    for i in hits {
        out.push_str(&s[from..i]);
        out.push(swap(s.as_bytes()[i]));
        from = i + 1;
    }
    out.push_str(&s[from..]);
    out
}

/// MQTT-4.7: does `topic` match `filter`? `$`-topics are not matched by a leading
/// wildcard (MQTT-4.7.2-1).
pub fn matches(filter: &str, topic: &str) -> bool {
    if topic.starts_with('$') && (filter.starts_with('+') || filter.starts_with('#')) {
        return false;
    }
    let mut f = filter.split('/');
    let mut t = topic.split('/');
    loop {
        match (f.next(), t.next()) {
            (Some("#"), _) => return true,
            (Some("+"), Some(_)) => {}
            (Some(a), Some(b)) if a == b => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mapping_round_trips_and_matches_rabbitmq() {
        assert_eq!(to_amqp("a/b/c"), "a.b.c");
        assert_eq!(to_amqp("sensors/+/temp"), "sensors.*.temp");
        assert_eq!(to_amqp("a/#"), "a.#");
        assert_eq!(to_amqp("v1.2/x"), "v1/2.x");
        assert_eq!(to_amqp("é/ü.+"), "é.ü/*");
        assert_eq!(to_mqtt("a.*.b/c"), "a/*/b.c");
        assert_eq!(filter_to_mqtt("a.*.#"), "a/+/#");
        for t in [
            "a/b",
            "v1.2/x",
            "/leading",
            "trailing/",
            "a//b",
            "$SYS/x",
            "a/*b",
            "é/ü.x/日本",
            "",
        ] {
            assert_eq!(to_mqtt(&to_amqp(t)), t);
        }
        for f in ["a/+/c", "a/#", "v1.2/+", "+"] {
            assert_eq!(filter_to_mqtt(&to_amqp(f)), f);
        }
    }

    #[test]
    fn filter_matching() {
        assert!(matches("a/+/c", "a/b/c"));
        assert!(matches("a/#", "a"));
        assert!(matches("a/#", "a/b/c"));
        assert!(matches("#", "a/b"));
        assert!(!matches("#", "$SYS/x"));
        assert!(!matches("+/x", "$SYS/x"));
        assert!(matches("$SYS/#", "$SYS/x"));
        assert!(!matches("a/+", "a/b/c"));
        assert!(matches("+", ""));
    }
}
