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

impl Destination {
    /// Parses a destination; `None` if it is not one of RabbitMQ's kinds. Names are
    /// percent-decoded (`%2F` for a `/` inside a queue name), as RabbitMQ does.
    pub fn parse(s: &str) -> Option<Destination> {
        let name = |rest: &str| -> Option<String> {
            let n = percent_decode(rest)?;
            (!n.is_empty()).then_some(n)
        };
        if let Some(rest) = s.strip_prefix("/queue/") {
            return name(rest).map(Destination::Queue);
        }
        if let Some(rest) = s.strip_prefix("/amq/queue/") {
            return name(rest).map(Destination::AmqQueue);
        }
        if let Some(rest) = s.strip_prefix("/topic/") {
            return name(rest).map(Destination::Topic);
        }
        if let Some(rest) = s.strip_prefix("/temp-queue/") {
            return name(rest).map(Destination::TempQueue);
        }
        if let Some(rest) = s.strip_prefix("/reply-queue/") {
            return name(rest).map(Destination::ReplyQueue);
        }
        if let Some(rest) = s.strip_prefix("/exchange/") {
            let (x, pattern) = match rest.split_once('/') {
                Some((x, p)) => (x, percent_decode(p)?),
                None => (rest, String::new()),
            };
            return name(x).map(|x| Destination::Exchange(x, pattern));
        }
        None
    }
}

/// The `destination` header of a delivered message, from where it was published.
pub fn of_message(exchange: &str, routing_key: &str) -> String {
    match exchange {
        "" => format!("/queue/{}", percent_encode(routing_key)),
        "amq.topic" => format!("/topic/{}", percent_encode(routing_key)),
        x => format!(
            "/exchange/{}/{}",
            percent_encode(x),
            percent_encode(routing_key)
        ),
    }
}

fn percent_decode(s: &str) -> Option<String> {
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
fn percent_encode(s: &str) -> String {
    if !s.contains(['/', '%']) {
        return s.to_owned();
    }
    s.replace('%', "%25").replace('/', "%2F")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_rabbitmq_kinds() {
        use Destination::*;
        assert_eq!(Destination::parse("/queue/a"), Some(Queue("a".into())));
        assert_eq!(
            Destination::parse("/amq/queue/a"),
            Some(AmqQueue("a".into()))
        );
        assert_eq!(
            Destination::parse("/topic/a.b.#"),
            Some(Topic("a.b.#".into()))
        );
        assert_eq!(
            Destination::parse("/exchange/amq.direct/k"),
            Some(Exchange("amq.direct".into(), "k".into()))
        );
        assert_eq!(
            Destination::parse("/exchange/amq.fanout"),
            Some(Exchange("amq.fanout".into(), String::new()))
        );
        assert_eq!(
            Destination::parse("/temp-queue/r"),
            Some(TempQueue("r".into()))
        );
        assert_eq!(
            Destination::parse("/reply-queue/amq.gen-x"),
            Some(ReplyQueue("amq.gen-x".into()))
        );
        assert_eq!(
            Destination::parse("/queue/a%2Fb"),
            Some(Queue("a/b".into()))
        );
        assert_eq!(Destination::parse("/queue/"), None);
        assert_eq!(Destination::parse("/foo/bar"), None);
        assert_eq!(Destination::parse("/queue/%zz"), None);
    }

    #[test]
    fn message_destinations_round_trip() {
        for (x, k) in [("", "q/1"), ("amq.topic", "a.b"), ("ex", "k%")] {
            let d = of_message(x, k);
            let back = Destination::parse(&d).unwrap();
            match back {
                Destination::Queue(n) => assert_eq!((x, n.as_str()), ("", k)),
                Destination::Topic(n) => assert_eq!((x, n.as_str()), ("amq.topic", k)),
                Destination::Exchange(e, n) => assert_eq!((e.as_str(), n.as_str()), (x, k)),
                other => panic!("{other:?}"),
            }
        }
    }
}
