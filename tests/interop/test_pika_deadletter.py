"""Dead-lettering: x-death as RabbitMQ writes it, for each reason.

Field types matter to typed clients (Java's Long, Go's int64): `count` is a long ('l'),
`time` a timestamp ('T'), `routing-keys` an array of longstr. pika decodes 'l' as
pika.compat.long and 'T' as datetime.
"""
import datetime

import pika
import pytest
from pika.compat import long

from amqp_helpers import drain, get, wait_ready


def dlx_args(dead_queue, **extra):
    """Queue arguments that dead-letter to `dead_queue` through the default exchange."""
    return {"x-dead-letter-exchange": "", "x-dead-letter-routing-key": dead_queue, **extra}


def reject(ch, queue, requeue=False):
    m, _, _ = get(ch, queue, auto_ack=False)
    assert m is not None, f"nothing in {queue}"
    ch.basic_reject(m.delivery_tag, requeue=requeue)


def test_reject_dead_letters_with_x_death(ch, name):
    dlx = name + "-dlx"
    ch.exchange_declare(dlx, "direct")
    ch.queue_declare(name + "-dead")
    ch.queue_bind(name + "-dead", dlx, name)  # no x-dead-letter-routing-key: the original key is kept
    ch.queue_declare(name, arguments={"x-dead-letter-exchange": dlx})
    ch.queue_bind(name, "amq.direct", name)
    ch.basic_publish("amq.direct", name, b"bad", pika.BasicProperties(
        headers={"h": 1}, message_id="m1", expiration="60000", delivery_mode=2))
    reject(ch, name)
    m, props, body = get(ch, name + "-dead")
    assert body == b"bad"
    assert m.exchange == dlx and m.routing_key == name
    assert not m.redelivered
    assert props.message_id == "m1" and props.delivery_mode == 2
    assert props.expiration is None, "the expiration property moves into x-death"
    assert props.headers["h"] == 1
    deaths = props.headers["x-death"]
    assert len(deaths) == 1
    d = deaths[0]
    assert d["reason"] == "rejected"
    assert d["queue"] == name
    assert d["exchange"] == "amq.direct"
    assert d["routing-keys"] == [name]
    assert d["count"] == 1 and isinstance(d["count"], long)
    assert isinstance(d["time"], datetime.datetime)
    assert abs((d["time"] - datetime.datetime.utcnow()).total_seconds()) < 120
    assert d["original-expiration"] == "60000"
    assert props.headers["x-first-death-reason"] == "rejected"
    assert props.headers["x-first-death-queue"] == name
    assert props.headers["x-first-death-exchange"] == "amq.direct"


def test_dead_letter_routing_keys_include_cc_and_cc_is_removed(ch, name):
    ch.queue_declare(name + "-dead")
    ch.queue_declare(name, arguments=dlx_args(name + "-dead"))
    ch.queue_declare(name + "-cc")
    ch.basic_publish("", name, b"m", pika.BasicProperties(headers={"CC": [name + "-cc"], "keep": "me"}))
    assert get(ch, name + "-cc")[2] == b"m", "CC routes a copy"
    reject(ch, name)
    _, props, _ = get(ch, name + "-dead")
    assert props.headers["x-death"][0]["routing-keys"] == [name, name + "-cc"]
    assert "CC" not in props.headers, "RabbitMQ drops CC from a dead-lettered message"
    assert props.headers["keep"] == "me"


def test_nack_multiple_dead_letters_all(ch, name):
    ch.queue_declare(name + "-dead")
    ch.queue_declare(name, arguments=dlx_args(name + "-dead"))
    for i in range(3):
        ch.basic_publish("", name, str(i).encode())
    wait_ready(ch, name, 3)
    tags = [ch.basic_get(name)[0].delivery_tag for _ in range(3)]
    ch.basic_nack(tags[-1], multiple=True, requeue=False)
    wait_ready(ch, name + "-dead", 3)
    assert drain(ch, name + "-dead") == [b"0", b"1", b"2"]


def test_x_death_counts_cycles_most_recent_first(ch, name):
    a, b = name + "-a", name + "-b"
    ch.queue_declare(a, arguments=dlx_args(b))
    ch.queue_declare(b, arguments=dlx_args(a))
    ch.basic_publish("", a, b"cycle")
    for q in [a, b, a]:
        reject(ch, q)
    m, props, _ = get(ch, b)
    assert m.routing_key == b
    deaths = [(d["queue"], d["reason"], d["count"], d["routing-keys"]) for d in props.headers["x-death"]]
    assert deaths == [(a, "rejected", 2, [a]), (b, "rejected", 1, [b])]
    assert props.headers["x-first-death-queue"] == a
    assert props.headers["x-first-death-reason"] == "rejected"


def test_queue_ttl_dead_letters_expired(ch, name):
    ch.queue_declare(name + "-dead")
    ch.queue_declare(name, arguments=dlx_args(name + "-dead", **{"x-message-ttl": 100}))
    ch.basic_publish("", name, b"old")
    m, props, body = get(ch, name + "-dead", timeout=5)
    assert body == b"old"
    d = props.headers["x-death"][0]
    assert (d["reason"], d["queue"], d["count"]) == ("expired", name, 1)
    assert "original-expiration" not in d
    assert props.headers["x-first-death-reason"] == "expired"
    assert ch.queue_declare(name, passive=True).method.message_count == 0


def test_per_message_expiration_dead_letters_expired(ch, name):
    ch.queue_declare(name + "-dead")
    ch.queue_declare(name, arguments=dlx_args(name + "-dead"))
    ch.basic_publish("", name, b"e", pika.BasicProperties(expiration="50"))
    m, props, body = get(ch, name + "-dead", timeout=5)
    assert body == b"e"
    assert props.expiration is None
    d = props.headers["x-death"][0]
    assert d["reason"] == "expired" and d["original-expiration"] == "50"


def test_ttl_zero_delivers_to_a_ready_consumer_else_expires(conn, ch, name):
    ch.queue_declare(name + "-dead")
    ch.queue_declare(name, arguments=dlx_args(name + "-dead", **{"x-message-ttl": 0}))
    ch.basic_publish("", name, b"nobody-waiting")
    assert get(ch, name + "-dead")[2] == b"nobody-waiting"
    got = []
    ch.basic_consume(name, lambda c, m, p, b: got.append(b), auto_ack=True)
    ch.basic_publish("", name, b"consumer-waiting")
    deadline = 40
    while not got and deadline:
        conn.process_data_events(time_limit=0.05)
        deadline -= 1
    assert got == [b"consumer-waiting"]
    assert drain(ch, name + "-dead") == []


def test_max_length_drop_head_dead_letters_maxlen(ch, name):
    ch.queue_declare(name + "-dead")
    ch.queue_declare(name, arguments=dlx_args(name + "-dead", **{"x-max-length": 2}))
    for b in [b"1", b"2", b"3"]:
        ch.basic_publish("", name, b)
    m, props, body = get(ch, name + "-dead")
    assert body == b"1" and props.headers["x-death"][0]["reason"] == "maxlen"
    assert drain(ch, name) == [b"2", b"3"]


def test_max_length_bytes_drop_head(ch, name):
    ch.queue_declare(name, arguments={"x-max-length-bytes": 10})
    for b in [b"aaaa", b"bbbb", b"cccc"]:
        ch.basic_publish("", name, b)
    wait_ready(ch, name, 2)
    assert drain(ch, name) == [b"bbbb", b"cccc"]


def test_reject_publish_dlx_nacks_and_dead_letters(ch, name):
    ch.queue_declare(name + "-dead")
    ch.queue_declare(name, arguments=dlx_args(name + "-dead", **{"x-max-length": 1, "x-overflow": "reject-publish-dlx"}))
    ch.confirm_delivery()
    ch.basic_publish("", name, b"1")
    with pytest.raises(pika.exceptions.NackError):
        ch.basic_publish("", name, b"2")
    m, props, body = get(ch, name + "-dead")
    assert body == b"2"
    d = props.headers["x-death"][0]
    assert (d["reason"], d["queue"]) == ("maxlen", name)
    assert drain(ch, name) == [b"1"]


def test_reject_publish_does_not_dead_letter(ch, name):
    ch.queue_declare(name + "-dead")
    ch.queue_declare(name, arguments=dlx_args(name + "-dead", **{"x-max-length": 1, "x-overflow": "reject-publish"}))
    ch.confirm_delivery()
    ch.basic_publish("", name, b"1")
    with pytest.raises(pika.exceptions.NackError):
        ch.basic_publish("", name, b"2")
    assert drain(ch, name + "-dead") == []


def test_dead_letter_exchange_missing_drops(ch, name):
    ch.queue_declare(name, arguments={"x-dead-letter-exchange": name + "-missing"})
    ch.basic_publish("", name, b"x")
    reject(ch, name)
    assert ch.is_open
    assert drain(ch, name) == []
