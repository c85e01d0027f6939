"""Stream queues (`x-queue-type: stream`) as RabbitMQ 3.10 shows them to an AMQP 0-9-1
client: the arguments (the declare rules shared with quorum queues are in
test_pika_quorum.py), reading from an offset (`x-stream-offset`: first,
last, next, a number, a timestamp, an interval), several independent readers, acks that
only return credit, and the operations streams refuse. Checked against RabbitMQ with this
file; the restart test is Warren's own.
"""
import datetime
import time

import pika
import pytest

from amqp_helpers import channel_error, connection_error, pump

STREAM = {"x-queue-type": "stream"}


def check(err, code, text):
    assert (err.reply_code, err.reply_text) == (code, text)


def declare(ch, name, **args):
    ch.queue_declare(name, durable=True, arguments={**STREAM, **args})


def publish(ch, name, n, start=0):
    ch.confirm_delivery()
    for i in range(start, start + n):
        # Transient and persistent alike: a stream keeps everything.
        ch.basic_publish("", name, str(i).encode(),
                         pika.BasicProperties(delivery_mode=1 + i % 2, headers={"i": i}))


def read(conn, ch, name, offset=None, n=100, prefetch=10, ack=True, tag=None, seconds=3):
    """Consumes `name` from `offset` until `n` messages came (or it goes quiet); returns
    (body, x-stream-offset) pairs."""
    got = []

    def on(c, m, p, b):
        got.append((b.decode(), p.headers["x-stream-offset"], m.redelivered))
        if ack:
            c.basic_ack(m.delivery_tag)

    ch.basic_qos(prefetch_count=prefetch)
    args = {} if offset is None else {"x-stream-offset": offset}
    ch.basic_consume(name, on, arguments=args, consumer_tag=tag)
    pump(conn, lambda: len(got) >= n, seconds=seconds)
    return got


@pytest.mark.parametrize("arg,value", [
    ("x-message-ttl", 1000), ("x-max-length", 10), ("x-dead-letter-exchange", "x"),
    ("x-max-priority", 5), ("x-expires", 100000), ("x-overflow", "reject-publish"),
    ("x-single-active-consumer", True),
])
def test_classic_arguments_refused(conn, name, arg, value):
    err = channel_error(conn, lambda ch: declare(ch, name, **{arg: value}))
    check(err, 406, f"PRECONDITION_FAILED - invalid arg '{arg}' for queue '{name}' in "
                    "vhost '/' of queue type rabbit_stream_queue")


@pytest.mark.parametrize("value,why", [
    ("10X", "invalid_max_age"),
    (10, "{unacceptable_type,signedint}"),
])
def test_bad_max_age(conn, name, value, why):
    err = channel_error(conn, lambda ch: declare(ch, name, **{"x-max-age": value}))
    check(err, 406, f"PRECONDITION_FAILED - invalid arg 'x-max-age' for queue '{name}' in "
                    f"vhost '/': {why}")


def test_redeclare_equivalence(conn, ch, name):
    declare(ch, name, **{"x-max-age": "1h", "x-stream-max-segment-size-bytes": 10000})
    declare(ch, name, **{"x-max-age": "1h", "x-stream-max-segment-size-bytes": 10000})
    err = channel_error(conn, lambda c: c.queue_declare(name, durable=True))
    check(err, 406, f"PRECONDITION_FAILED - inequivalent arg 'x-queue-type' for queue "
                    f"'{name}' in vhost '/': received none but current is the value "
                    "'stream' of type 'longstr'")
    err = channel_error(conn, lambda c: declare(c, name, **{"x-max-age": "2h"}))
    check(err, 406, f"PRECONDITION_FAILED - inequivalent arg 'x-max-age' for queue "
                    f"'{name}' in vhost '/': received '2h' but current is '1h'")


@pytest.mark.parametrize("offset,expected", [
    ("first", list(range(10))),
    ("last", [9]),
    ("next", []),
    (None, []),
    (5, [5, 6, 7, 8, 9]),
    (100, []),
    (-1, list(range(10))),
    ("10m", list(range(10))),
])
def test_read_from_offset(conn, ch, name, offset, expected):
    declare(ch, name)
    publish(ch, name, 10)
    got = read(conn, conn.channel(), name, offset, n=len(expected) or 1,
               seconds=3 if expected else 1)
    assert [int(b) for b, _, _ in got] == expected
    assert [o for _, o, _ in got] == expected, "x-stream-offset is the message's offset"
    assert not any(r for _, _, r in got)


def test_timestamp_offsets(conn, ch, name):
    declare(ch, name)
    publish(ch, name, 3)
    past = datetime.datetime.now() - datetime.timedelta(minutes=1)
    future = datetime.datetime.now() + datetime.timedelta(minutes=1)
    assert len(read(conn, conn.channel(), name, past, n=3)) == 3
    assert read(conn, conn.channel(), name, future, n=1, seconds=1) == []


def test_readers_are_independent_and_acks_do_not_remove(conn, ch, name):
    declare(ch, name)
    publish(ch, name, 5)
    c = conn.channel()
    a = read(conn, c, name, "first", n=5, tag="a")
    b = read(conn, c, name, 3, n=2, tag="b")
    assert [o for _, o, _ in a] == [0, 1, 2, 3, 4]
    assert [o for _, o, _ in b] == [3, 4]
    # Acked, and still all there for the next reader.
    assert len(read(conn, conn.channel(), name, "first", n=5)) == 5


def test_prefetch_bounds_unacked_deliveries(conn, ch, name):
    declare(ch, name)
    publish(ch, name, 10)
    got = read(conn, conn.channel(), name, "first", n=10, prefetch=3, ack=False)
    assert len(got) == 3


def test_live_reader_gets_new_messages(conn, ch, name):
    declare(ch, name)
    publish(ch, name, 3)
    c = conn.channel()
    got = read(conn, c, name, "next", n=1, seconds=1)
    assert got == []
    publish(ch, name, 2, start=3)
    pump(conn, lambda: len(got) >= 2)
    assert [o for _, o, _ in got] == [3, 4]


def test_consumer_needs_prefetch(conn, ch, name):
    declare(ch, name)

    def consume(c):
        c.basic_consume(name, lambda *a: None)
        c.connection.process_data_events(0.5)

    err = channel_error(conn, consume)
    check(err, 406, f"PRECONDITION_FAILED - consumer prefetch count is not set for "
                    f"'queue '{name}' in vhost '/''")


def test_bad_offset_refused(conn, ch, name):
    declare(ch, name)

    def consume(c):
        c.basic_qos(prefetch_count=1)
        c.basic_consume(name, lambda *a: None, arguments={"x-stream-offset": "3"})

    err = channel_error(conn, consume)
    check(err, 406, f"PRECONDITION_FAILED - invalid arg 'x-stream-offset' for queue "
                    f"'{name}' in vhost '/': {{invalid_stream_offset_arg,{{longstr,<<\"3\">>}}}}")


def stream_540(broker, name, fn, what):
    c = pika.BlockingConnection(pika.URLParameters(broker.url))
    declare(c.channel(), name)
    publish(c.channel(), name, 2)
    c.close()
    err = connection_error(broker.url, fn)
    check(err, 540, f"NOT_IMPLEMENTED - {what} not supported by stream queues queue "
                    f"'{name}' in vhost '/'")


def test_get_refused(broker, name):
    stream_540(broker, name, lambda ch: ch.basic_get(name), "basic.get")


def test_purge_refused(broker, name):
    stream_540(broker, name, lambda ch: ch.queue_purge(name), "queue.purge")


def test_auto_ack_refused(broker, name):
    def consume(c):
        c.basic_qos(prefetch_count=1)
        c.basic_consume(name, lambda *a: None, auto_ack=True)
        c.connection.process_data_events(0.5)

    stream_540(broker, name, consume, "automatic acknowledgement")


def test_nack_refused(broker, name):
    def consume(c):
        c.basic_qos(prefetch_count=1)
        c.basic_consume(name, lambda c_, m, p, b: c_.basic_nack(m.delivery_tag),
                        arguments={"x-stream-offset": "first"})
        for _ in range(20):
            c.connection.process_data_events(0.1)

    stream_540(broker, name, consume, "basic.nack and basic.reject")


def test_stream_survives_restart(warren, name):
    c = pika.BlockingConnection(pika.URLParameters(warren.url))
    declare(c.channel(), name)
    publish(c.channel(), name, 20)
    c.close()
    warren.restart()
    c = pika.BlockingConnection(pika.URLParameters(warren.url))
    got = read(c, c.channel(), name, "first", n=20)
    assert [(int(b), o) for b, o, _ in got] == [(i, i) for i in range(20)]
    # New messages continue the offsets.
    publish(c.channel(), name, 1, start=20)
    assert [o for _, o, _ in read(c, c.channel(), name, "last", n=1)] == [20]
    c.close()


def test_long_stream_read_back_from_the_store(warren, name):
    """More than the in-memory tail (16,384 messages): the oldest are read from RocksDB."""
    c = pika.BlockingConnection(pika.URLParameters(warren.url))
    ch = c.channel()
    declare(ch, name)
    n = 20000
    for i in range(n):
        ch.basic_publish("", name, str(i).encode())
    ch.confirm_delivery()
    ch.basic_publish("", name, str(n).encode())
    got = read(c, c.channel(), name, "first", n=n + 1, prefetch=1000)
    assert [o for _, o, _ in got] == list(range(n + 1))
    assert [int(b) for b, _, _ in got] == list(range(n + 1))
    c.close()


def test_retention_by_bytes_drops_old_segments(conn, ch, name):
    declare(ch, name, **{"x-max-length-bytes": 2000,
                         "x-stream-max-segment-size-bytes": 500})
    ch.confirm_delivery()
    for i in range(100):
        ch.basic_publish("", name, b"x" * 100)
    got = read(conn, conn.channel(), name, "first", n=100, seconds=2)
    offsets = [o for _, o, _ in got]
    print(offsets)
    assert 0 < len(offsets) < 100, "old segments dropped"
    assert offsets == sorted(offsets)
