"""Quorum queues as RabbitMQ 3.10 shows them to an AMQP 0-9-1 client: the declare
rules, argument equivalence, the delivery count (`x-delivery-count`) and the delivery limit
that dead-letters a poison message, and no global prefetch.

Warren keeps one copy of a quorum queue (no Raft group); what a client can observe is
the same, checked against RabbitMQ with this file.
"""
import time

import pytest

from amqp_helpers import channel_error, connection_error, get, wait_ready

QUORUM = {"x-queue-type": "quorum"}


def check(err, code, text):
    assert (err.reply_code, err.reply_text) == (code, text)


# Streams share these declare rules (test_pika_streams.py has the rest of them).
TYPES = pytest.mark.parametrize("qtype", ["quorum", "stream"])


@TYPES
@pytest.mark.parametrize("flags,refused", [
    (dict(durable=False), "non-durable"),
    (dict(durable=True, exclusive=True), "exclusive-owner"),
    (dict(durable=True, auto_delete=True), "auto-delete"),
    # several at once: auto-delete is named first, then exclusive
    (dict(durable=False, exclusive=True, auto_delete=True), "auto-delete"),
    (dict(durable=False, exclusive=True), "exclusive-owner"),
])
def test_replicated_queue_properties_refused(conn, name, flags, refused, qtype):
    args = {"x-queue-type": qtype}
    err = channel_error(conn, lambda ch: ch.queue_declare(name, arguments=args, **flags))
    check(err, 406, f"PRECONDITION_FAILED - invalid property '{refused}' for queue "
                    f"'{name}' in vhost '/'")


@TYPES
def test_replicated_queue_cannot_be_server_named(conn, qtype):
    args = {"x-queue-type": qtype}
    err = channel_error(conn, lambda ch: ch.queue_declare("", durable=True, arguments=args))
    check(err, 406, "PRECONDITION_FAILED - Cannot declare a server-named queue for type "
                    f"rabbit_{qtype}_queue")


@pytest.mark.parametrize("first,second,text", [
    (QUORUM, {}, "received none but current is the value 'quorum' of type 'longstr'"),
    (QUORUM, {"x-queue-type": "classic"}, "received 'classic' but current is 'quorum'"),
    ({}, QUORUM, "received the value 'quorum' of type 'longstr' but current is none"),
])
def test_queue_type_equivalence(conn, ch, name, first, second, text):
    ch.queue_declare(name, durable=True, arguments=first)
    err = channel_error(conn, lambda c: c.queue_declare(name, durable=True, arguments=second))
    check(err, 406, f"PRECONDITION_FAILED - inequivalent arg 'x-queue-type' for queue "
                    f"'{name}' in vhost '/': {text}")


def test_classic_is_the_default_type(ch, name):
    ch.queue_declare(name, durable=True)
    ch.queue_declare(name, durable=True, arguments={"x-queue-type": "classic"})
    ch.queue_declare(name + "-2", durable=True, arguments={"x-queue-type": "classic"})
    ch.queue_declare(name + "-2", durable=True)


@pytest.mark.parametrize("first,second,text", [
    ({"x-delivery-limit": 3}, {"x-delivery-limit": 4}, "received '4' but current is '3'"),
    ({"x-delivery-limit": 3}, {},
     "received none but current is the value '3' of type 'signedint'"),
    ({}, {"x-delivery-limit": 3},
     "received the value '3' of type 'signedint' but current is none"),
    ({"x-quorum-initial-group-size": 1}, {},
     "received none but current is the value '1' of type 'signedint'"),
])
def test_quorum_argument_equivalence(conn, ch, name, first, second, text):
    key = next(iter(first or second))
    ch.queue_declare(name, durable=True, arguments={**QUORUM, **first})
    err = channel_error(
        conn, lambda c: c.queue_declare(name, durable=True, arguments={**QUORUM, **second}))
    check(err, 406, f"PRECONDITION_FAILED - inequivalent arg '{key}' for queue '{name}' "
                    f"in vhost '/': {text}")


def test_classic_queue_arguments_compared(conn, ch, name):
    ch.queue_declare(name, durable=True, arguments={"x-queue-mode": "lazy"})
    err = channel_error(conn, lambda c: c.queue_declare(name, durable=True))
    check(err, 406, f"PRECONDITION_FAILED - inequivalent arg 'x-queue-mode' for queue "
                    f"'{name}' in vhost '/': received none but current is the value 'lazy' "
                    f"of type 'longstr'")
    # an argument only another queue type knows is not compared
    ch2 = conn.channel()
    ch2.queue_declare(name, durable=True,
                      arguments={"x-queue-mode": "lazy", "x-delivery-limit": 3})


def test_delivery_count_on_redelivery(conn, ch, name):
    ch.queue_declare(name, durable=True, arguments=QUORUM)
    ch.basic_publish("", name, b"m")
    wait_ready(ch, name, 1)
    # basic.get shows the count from the first delivery on
    seen = []
    for _ in range(3):
        method, props, _ = get(ch, name, auto_ack=False)
        seen.append((method.redelivered, props.headers["x-delivery-count"]))
        ch.basic_nack(method.delivery_tag, requeue=True)
    assert seen == [(False, 0), (True, 1), (True, 2)]
    ch.queue_purge(name)

    # consumers see it only on redeliveries
    ch.basic_publish("", name, b"c")
    got = []

    def on_message(c, method, props, body):
        got.append((method.redelivered, (props.headers or {}).get("x-delivery-count")))
        c.basic_nack(method.delivery_tag, requeue=len(got) < 3)

    tag = ch.basic_consume(name, on_message)
    deadline = time.time() + 5
    while len(got) < 3 and time.time() < deadline:
        conn.process_data_events(time_limit=0.05)
    ch.basic_cancel(tag)
    assert got == [(False, None), (True, 1), (True, 2)]


def test_delivery_limit_dead_letters(conn, ch, name):
    dlq = name + "-dlq"
    ch.queue_declare(dlq, durable=True)
    ch.queue_declare(name, durable=True, arguments={
        **QUORUM, "x-delivery-limit": 2,
        "x-dead-letter-exchange": "", "x-dead-letter-routing-key": dlq})
    ch.basic_publish("", name, b"poison")
    wait_ready(ch, name, 1)
    counts = []
    for _ in range(4):
        method, props, _ = get(ch, name, timeout=0.5, auto_ack=False)
        if method is None:
            break
        counts.append(props.headers["x-delivery-count"])
        ch.basic_nack(method.delivery_tag, requeue=True)
    # delivered limit + 1 times, then dead-lettered
    assert counts == [0, 1, 2]
    method, props, body = get(ch, dlq)
    assert body == b"poison"
    death = props.headers["x-death"][0]
    assert (death["reason"], death["queue"], death["count"]) == ("delivery_limit", name, 1)
    assert props.headers["x-first-death-reason"] == "delivery_limit"
    assert "x-delivery-count" not in props.headers


def test_delivery_limit_counts_closed_channels(broker, conn, ch, name):
    ch.queue_declare(name, durable=True, arguments={**QUORUM, "x-delivery-limit": 1})
    ch.basic_publish("", name, b"m")
    wait_ready(ch, name, 1)
    seen = []
    for _ in range(3):
        other = conn.channel()
        method, props, _ = get(other, name, timeout=0.5, auto_ack=False)
        if method is None:
            break
        seen.append(props.headers["x-delivery-count"])
        other.close()  # unacked: returned to the queue
        wait_ready(ch, name, 1, timeout=0.5)
    # no dead-letter exchange: dropped after the limit
    assert seen == [0, 1]
    assert ch.queue_declare(name, passive=True).method.message_count == 0


def test_zero_delivery_limit(ch, name):
    ch.queue_declare(name, durable=True, arguments={**QUORUM, "x-delivery-limit": 0})
    ch.basic_publish("", name, b"m")
    method, _, _ = get(ch, name, auto_ack=False)
    ch.basic_reject(method.delivery_tag, requeue=True)
    time.sleep(0.2)
    assert ch.basic_get(name)[0] is None


def test_global_qos_refused_on_quorum_queue(broker, ch, name):
    ch.queue_declare(name, durable=True, arguments=QUORUM)

    def consume(c):
        c.basic_qos(prefetch_count=10, global_qos=True)
        c.basic_consume(name, lambda *a: None)

    check(connection_error(broker.url, consume), 540,
          f"NOT_IMPLEMENTED - queue '{name}' in vhost '/' does not support global qos")


def test_global_qos_zero_and_per_consumer_qos_are_fine(conn, ch, name):
    ch.queue_declare(name, durable=True, arguments=QUORUM)
    ch.basic_qos(prefetch_count=0, global_qos=True)
    ch.basic_qos(prefetch_count=5)
    tag = ch.basic_consume(name, lambda *a: None)
    ch.basic_cancel(tag)
    assert conn.is_open
