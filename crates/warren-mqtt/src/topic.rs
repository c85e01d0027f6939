//! MQTT topics ↔ AMQP routing keys on `amq.topic`, the RabbitMQ way: `/` and `.` swap
//! (so a `.` inside an MQTT level survives as `/` in the AMQP word and comes back), `+` ↔
//! `*`, `#` ↔ `#`. docs/mqtt.md has the table.

/// An MQTT topic name or filter as an AMQP routing/binding key.
pub fn to_amqp(topic: &str) -> String {
    topic
        .chars()
        .map(|c| match c {
            '/' => '.',
            '.' => '/',
            '+' => '*',
            other => other,
        })
        .collect()
}

/// An AMQP routing key as the MQTT topic a subscriber sees (a `*` in a key is a literal
/// character, as in an MQTT topic name).
pub fn to_mqtt(key: &str) -> String {
    key.chars()
        .map(|c| match c {
            '.' => '/',
            '/' => '.',
            other => other,
        })
        .collect()
}

/// An AMQP binding key as the MQTT filter it came from (`*` ↔ `+`).
pub fn filter_to_mqtt(key: &str) -> String {
    key.chars()
        .map(|c| match c {
            '.' => '/',
            '/' => '.',
            '*' => '+',
            other => other,
        })
        .collect()
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
        for t in [
            "a/b",
            "v1.2/x",
            "/leading",
            "trailing/",
            "a//b",
            "$SYS/x",
            "a/*b",
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
