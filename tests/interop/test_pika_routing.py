"""Routing edge cases: topic wildcards, headers matching, exchange-to-exchange graphs,
alternate exchanges, sender-selected distribution (CC/BCC). Expected values are what
RabbitMQ 3.10 does."""
import pika
import pytest

from amqp_helpers import drain, get, pump, wait_ready

TOPIC_KEYS = ["", "a", "a.c", "a.b.c", "a.b.b.c", "b", "c", "a.b", ".", "a..c"]
TOPIC_CASES = {
    "#": TOPIC_KEYS,
    "a.#": ["a", "a.c", "a.b.c", "a.b.b.c", "a.b", "a..c"],
    "a.#.c": ["a.c", "a.b.c", "a.b.b.c", "a..c"],
    "*": ["a", "b", "c"],
    "*.*": ["a.c", "a.b", "."],
    "a.*": ["a.c", "a.b"],
    "#.c": ["a.c", "a.b.c", "a.b.b.c", "c", "a..c"],
    "a.*.#": ["a.c", "a.b.c", "a.b.b.c", "a.b", "a..c"],
    "": [""],
    "a.b.c": ["a.b.c"],
}


def test_topic_wildcards(ch, name):
    x = name + "-t"
    ch.exchange_declare(x, "topic")
    patterns = list(TOPIC_CASES)
    for i, pattern in enumerate(patterns):
        ch.queue_declare(f"{name}-{i}")
        ch.queue_bind(f"{name}-{i}", x, pattern)
    for key in TOPIC_KEYS:
        ch.basic_publish(x, key, key.encode())
    wait_ready(ch, f"{name}-0", len(TOPIC_KEYS))
    got = {pattern: [b.decode() for b in drain(ch, f"{name}-{i}")] for i, pattern in enumerate(patterns)}
    assert got == TOPIC_CASES


def test_topic_overlapping_bindings_deliver_once(ch, name):
    x = name + "-t"
    ch.exchange_declare(x, "topic")
    ch.queue_declare(name)
    for pattern in ["a.*", "a.#", "#", "a.b"]:
        ch.queue_bind(name, x, pattern)
    ch.basic_publish(x, "a.b", b"once")
    ch.basic_publish(x, "z", b"hash-only")
    wait_ready(ch, name, 2)
    assert drain(ch, name) == [b"once", b"hash-only"]


HEADER_BINDINGS = [
    ({"x-match": "all"}, ["none", "a=1int", "a=1str", "xfoo"]),
    ({}, ["none", "a=1int", "a=1str", "xfoo"]),  # no x-match means all
    ({"x-match": "any"}, []),  # any of nothing matches nothing
    ({"x-match": "all", "a": 1}, ["a=1int"]),  # types matter: 1 is not "1"
    ({"x-match": "all", "a": "1"}, ["a=1str"]),
    ({"x-match": "all", "x-foo": "1"}, ["none", "a=1int", "a=1str", "xfoo"]),  # x- keys are ignored
    ({"x-match": "any-with-x", "x-foo": "1"}, ["xfoo"]),
    ({"x-match": "all-with-x", "x-foo": "1"}, ["xfoo"]),
    ({"x-match": "any", "a": "1", "x-foo": "1"}, ["a=1str"]),
]
HEADER_MESSAGES = [("none", None), ("a=1int", {"a": 1}), ("a=1str", {"a": "1"}), ("xfoo", {"x-foo": "1"})]


def test_headers_matching(ch, name):
    x = name + "-h"
    ch.exchange_declare(x, "headers")
    for i, (args, _) in enumerate(HEADER_BINDINGS):
        ch.queue_declare(f"{name}-{i}")
        ch.queue_bind(f"{name}-{i}", x, "", arguments=args)
    for body, headers in HEADER_MESSAGES:
        ch.basic_publish(x, "", body.encode(), pika.BasicProperties(headers=headers))
    wait_ready(ch, f"{name}-0", len(HEADER_MESSAGES))
    for i, (args, expected) in enumerate(HEADER_BINDINGS):
        assert [b.decode() for b in drain(ch, f"{name}-{i}")] == expected, args


def test_headers_binding_key_is_ignored(ch, name):
    x = name + "-h"
    ch.exchange_declare(x, "headers")
    ch.queue_declare(name)
    ch.queue_bind(name, x, "some-key", arguments={"x-match": "all", "k": "v"})
    ch.basic_publish(x, "another-key", b"m", pika.BasicProperties(headers={"k": "v", "extra": 1}))
    assert get(ch, name)[2] == b"m"


def test_fanout_ignores_routing_key(ch, name):
    x = name + "-f"
    ch.exchange_declare(x, "fanout")
    ch.queue_declare(name)
    ch.queue_bind(name, x, "only-this")
    ch.basic_publish(x, "something-else", b"m")
    assert get(ch, name)[2] == b"m"


def test_exchange_to_exchange_chain_and_cycle(ch, name):
    x1, x2, x3 = name + "-1", name + "-2", name + "-3"
    ch.exchange_declare(x1, "topic")
    ch.exchange_declare(x2, "fanout")
    ch.exchange_declare(x3, "direct")
    ch.exchange_bind(x2, x1, "orders.#")
    ch.exchange_bind(x3, x2)
    ch.exchange_bind(x1, x2)  # a cycle x1 -> x2 -> x1 must not loop or duplicate
    ch.queue_declare(name)
    ch.queue_bind(name, x3, "orders.new")
    ch.queue_bind(name, x2)  # the same queue reached twice: one copy
    ch.basic_publish(x1, "orders.new", b"one-copy")
    ch.basic_publish(x1, "payments.new", b"not-routed")
    wait_ready(ch, name, 1)
    ch.connection.sleep(0.1)
    assert drain(ch, name) == [b"one-copy"]


def test_long_exchange_chain_has_no_hop_limit(ch, name):
    """30 exchanges in a row, the last looping back to the first: one copy at the end.
    Celery's native delayed delivery chains 28 topic exchanges (kombu 5.5)."""
    xs = [f"{name}-{i}" for i in range(30)]
    for x in xs:
        ch.exchange_declare(x, "fanout")
    for src, dst in zip(xs, xs[1:]):
        ch.exchange_bind(dst, src)
    ch.exchange_bind(xs[0], xs[-1])
    ch.queue_declare(name)
    ch.queue_bind(name, xs[-1])
    ch.basic_publish(xs[0], "k", b"far")
    wait_ready(ch, name, 1)
    ch.connection.sleep(0.1)
    assert drain(ch, name) == [b"far"]
    for x in xs:
        ch.exchange_delete(x)


def test_alternate_exchange_only_when_the_exchange_itself_routes_nowhere(ch, name):
    """RabbitMQ's process_alternate: an exchange that routes to another exchange does not
    use its alternate exchange even if that one routes nowhere; the other's own AE does."""
    ch.exchange_declare(name + "-ae", "fanout")
    ch.queue_declare(name + "-alt")
    ch.queue_bind(name + "-alt", name + "-ae")
    ch.exchange_declare(name + "-src", "fanout", arguments={"alternate-exchange": name + "-ae"})
    ch.exchange_declare(name + "-dead-end", "direct")
    ch.exchange_bind(name + "-dead-end", name + "-src")
    ch.basic_publish(name + "-src", "k", b"lost")
    ch.exchange_declare(name + "-src2", "fanout")
    ch.exchange_declare(name + "-end2", "direct", arguments={"alternate-exchange": name + "-ae"})
    ch.exchange_bind(name + "-end2", name + "-src2")
    ch.basic_publish(name + "-src2", "k", b"via-inner-ae")
    wait_ready(ch, name + "-alt", 1)
    ch.connection.sleep(0.2)
    assert drain(ch, name + "-alt") == [b"via-inner-ae"]
    for x in ("-ae", "-src", "-dead-end", "-src2", "-end2"):
        ch.exchange_delete(name + x)


def test_alternate_exchange_and_mandatory(conn, ch, name):
    returned = []
    ch.add_on_return_callback(lambda c, m, p, b: returned.append((m.reply_code, b)))
    ch.exchange_declare(name + "-ae", "fanout")
    ch.queue_declare(name + "-alt")
    ch.queue_bind(name + "-alt", name + "-ae")
    ch.exchange_declare(name + "-with-ae", "direct", arguments={"alternate-exchange": name + "-ae"})
    ch.exchange_declare(name + "-missing-ae", "direct", arguments={"alternate-exchange": name + "-nope"})
    ch.basic_publish(name + "-with-ae", "k", b"to-ae", mandatory=True)
    ch.basic_publish(name + "-missing-ae", "k", b"returned", mandatory=True)
    pump(conn, lambda: returned)
    assert returned == [(312, b"returned")], "routed through an AE counts as routed"
    assert get(ch, name + "-alt")[2] == b"to-ae"


def test_cc_header_routes_copies(ch, name):
    ch.queue_declare(name + "-a")
    ch.queue_declare(name + "-b")
    ch.basic_publish("", name + "-a", b"m", pika.BasicProperties(headers={"CC": [name + "-b"], "k": 1}))
    for q in [name + "-a", name + "-b"]:
        m, props, body = get(ch, q)
        assert body == b"m"
        assert m.routing_key == name + "-a", "the delivery carries the publish routing key"
        assert props.headers == {"CC": [name + "-b"], "k": 1}, "CC is kept on deliveries"


def test_bcc_header_routes_copies_and_is_removed(ch, name):
    ch.queue_declare(name + "-a")
    ch.queue_declare(name + "-c")
    ch.basic_publish("", name + "-a", b"m", pika.BasicProperties(headers={"BCC": [name + "-c"], "k": 1}))
    for q in [name + "-a", name + "-c"]:
        m, props, body = get(ch, q)
        assert body == b"m", q
        assert props.headers == {"k": 1}, "BCC is removed before delivery"
