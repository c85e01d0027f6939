//! STOMP destinations as RabbitMQ's STOMP plugin reads them, and the reverse mapping from
//! a message's exchange and routing key to the `destination` header of a MESSAGE.

/// A parsed `destination` header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Destination {
    /// `/queue/<name>`: a durable queue, declared on first use, via the default exchange.
    Queue(String),
    /// `/amq/queue/<name>`: an existing queue only.
    AmqQueue(String),
    /// `/topic/<key>`: `amq.topic` with routing key (or binding pattern) `key`.
    Topic(String),
    /// `/exchange/<name>[/<pattern>]`.
    Exchange(String, String),
    /// `/temp-queue/<name>`: a private reply queue of this session.
    TempQueue(String),
    /// `/reply-queue/<queue>`: publishes to a temp queue (of any session) by its real name.
    ReplyQueue(String),
}

/// RabbitMQ's list, in its words, for the "Unknown destination" ERROR.
pub const VALID_TYPES: &str = "/temp-queue, /exchange, /topic, /queue, /amq/queue, /reply-queue/";

/// Why a destination was refused, in RabbitMQ's two kinds of ERROR.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DestError {
    /// No known prefix: "Unknown destination" (the whole destination).
    Unknown(String),
    /// A known prefix with a bad rest: "Invalid destination", `'<rest>' is not a valid
    /// <kind> destination` (RabbitMQ's kind names: queue, topic, exchange, amqqueue,
    /// temp_queue, reply_queue).
    Invalid { kind: &'static str, rest: String },
}

impl Destination {
    /// Parses a destination as RabbitMQ's `rabbit_routing_parser` does: split on `/`,
    /// exactly one name after a prefix (two for `/exchange/<name>/<pattern>`); a bare
    /// name without a slash is a queue. Names are percent-decoded (`%2F` for a `/` inside
    /// a queue name).
    pub fn parse(s: &str) -> Result<Destination, DestError> {
        use Destination::*;
        let parts: Vec<&str> = s.split('/').collect();
        match parts.as_slice() {
            [name] if !name.is_empty() => one("queue", &[name]).map(Queue),
            ["", "exchange", rest @ ..] => match rest {
                [name, pattern @ ..] if !name.is_empty() && pattern.len() <= 1 => {
                    let pattern = match pattern {
                        [p] => decode(p).ok_or_else(|| invalid("exchange", rest))?,
                        _ => String::new(),
                    };
                    Ok(Exchange(one("exchange", &[name])?, pattern))
                }
                _ => Err(invalid("exchange", rest)),
            },
            ["", "queue", rest @ ..] => one("queue", rest).map(Queue),
            ["", "topic", rest @ ..] => one("topic", rest).map(Topic),
            ["", "temp-queue", rest @ ..] => one("temp_queue", rest).map(TempQueue),
            ["", "amq", "queue", rest @ ..] => one("amqqueue", rest).map(AmqQueue),
            // Everything after the prefix names the queue, slashes included.
            ["", "reply-queue", _, ..] => {
                one("reply_queue", &[&s["/reply-queue/".len()..]]).map(ReplyQueue)
            }
            _ => Err(DestError::Unknown(s.to_owned())),
        }
    }
}

/// The single non-empty name `rest` must be.
fn one(kind: &'static str, rest: &[&str]) -> Result<String, DestError> {
    match rest {
        [name] if !name.is_empty() => decode(name).ok_or_else(|| invalid(kind, rest)),
        _ => Err(invalid(kind, rest)),
    }
}

fn invalid(kind: &'static str, rest: &[&str]) -> DestError {
    // RabbitMQ's to_url: nothing for no parts, else "/" and the parts joined by "/".
    let rest = if rest.is_empty() {
        String::new()
    } else {
        format!("/{}", rest.join("/"))
    };
    DestError::Invalid { kind, rest }
}

/// The `destination` header of a delivered message, from where it was published, into
/// a reused string (one per session, written per delivery).
pub fn write_of_message(exchange: &str, routing_key: &str, out: &mut String) {
    out.clear();
    match (exchange, routing_key) {
        ("", _) => {
            out.push_str("/queue/");
            percent_encode_into(routing_key, out);
        }
        ("amq.topic", _) => {
            out.push_str("/topic/");
            percent_encode_into(routing_key, out);
        }
        // RabbitMQ's format_destination: no trailing slash for an empty key.
        (x, "") => {
            out.push_str("/exchange/");
            percent_encode_into(x, out);
        }
        (x, _) => {
            out.push_str("/exchange/");
            percent_encode_into(x, out);
            out.push('/');
            percent_encode_into(routing_key, out);
        }
    }
}

fn decode(s: &str) -> Option<String> {
    if !s.contains('%') {
        return Some(s.to_owned());
    }
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = s.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// Escapes what would change the meaning of a destination: `/` and `%`.
fn percent_encode_into(s: &str, out: &mut String) {
    for c in s.chars() {
        match c {
            '%' => out.push_str("%25"),
            '/' => out.push_str("%2F"),
            c => out.push(c),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_rabbitmq_kinds() {
        use Destination::*;
        let ok = |d: &str| Destination::parse(d).expect(d);
        assert_eq!(ok("/queue/a"), Queue("a".into()));
        assert_eq!(ok("a"), Queue("a".into()), "a bare name is a queue");
        assert_eq!(ok("/amq/queue/a"), AmqQueue("a".into()));
        assert_eq!(ok("/topic/a.b.#"), Topic("a.b.#".into()));
        assert_eq!(
            ok("/exchange/amq.direct/k"),
            Exchange("amq.direct".into(), "k".into())
        );
        assert_eq!(
            ok("/exchange/amq.fanout"),
            Exchange("amq.fanout".into(), String::new())
        );
        assert_eq!(ok("/temp-queue/r"), TempQueue("r".into()));
        assert_eq!(ok("/reply-queue/amq.gen-x"), ReplyQueue("amq.gen-x".into()));
        assert_eq!(ok("/reply-queue/a/b"), ReplyQueue("a/b".into()));
        assert_eq!(ok("/queue/a%2Fb"), Queue("a/b".into()));
    }

    #[test]
    fn refuses_as_rabbitmq() {
        // The answers of RabbitMQ 3.10 to these destinations.
        let invalid = |kind, rest: &str| {
            Err(DestError::Invalid {
                kind,
                rest: rest.into(),
            })
        };
        for (d, expected) in [
            ("/queue/", invalid("queue", "/")),
            ("/queue", invalid("queue", "")),
            ("/queue/bah/baz", invalid("queue", "/bah/baz")),
            ("/topic/a/b", invalid("topic", "/a/b")),
            ("/topic", invalid("topic", "")),
            ("/exchange", invalid("exchange", "")),
            ("/exchange/", invalid("exchange", "/")),
            ("/exchange//foo", invalid("exchange", "//foo")),
            ("/exchange/bah/baz/boo", invalid("exchange", "/bah/baz/boo")),
            ("/amq/queue/a/b", invalid("amqqueue", "/a/b")),
            ("/amq/queue", invalid("amqqueue", "")),
            ("/temp-queue/", invalid("temp_queue", "/")),
            ("/reply-queue/", invalid("reply_queue", "/")),
            ("/queue/%zz", invalid("queue", "/%zz")),
            ("/foo/bar", Err(DestError::Unknown("/foo/bar".into()))),
            ("zz/x", Err(DestError::Unknown("zz/x".into()))),
            ("", Err(DestError::Unknown(String::new()))),
        ] {
            assert_eq!(Destination::parse(d), expected, "{d}");
        }
    }

    #[test]
    fn message_destinations_round_trip() {
        for (x, k) in [("", "q/1"), ("amq.topic", "a.b"), ("ex", "k%"), ("ex", "")] {
            let mut d = String::from("stale");
            write_of_message(x, k, &mut d);
            let back = Destination::parse(&d).expect("parses");
            match back {
                Destination::Queue(n) => assert_eq!((x, n.as_str()), ("", k)),
                Destination::Topic(n) => assert_eq!((x, n.as_str()), ("amq.topic", k)),
                Destination::Exchange(e, n) => assert_eq!((e.as_str(), n.as_str()), (x, k)),
                other => panic!("{other:?}"),
            }
        }
    }
}
