"""Durability with the real binary (Warren only: these restart and kill the broker).

- restart: SIGTERM, start again on the same data dir; durable exchanges, queues, bindings
  and persistent messages come back, unacked ones redelivered; transient messages and
  non-durable entities are gone.
- crash: `kill -9` while publishers in confirm mode publish as fast as they can; every
  confirmed message is there after the restart.
"""
import threading
import time
from collections import Counter

import pika
import pytest
from pika.exceptions import ChannelClosedByBroker, ConnectionClosedByBroker

from amqp_helpers import connect


def passive_missing(c, fn):
    try:
        fn(c.channel())
        return False
    except ChannelClosedByBroker as e:
        assert e.reply_code == 404
        return True


def test_restart_keeps_durable_state(warren, name):
    c = connect(warren.url)
    ch = c.channel()
    x, q = name + "-x", name
    ch.exchange_declare(x, "topic", durable=True)
    ch.exchange_declare(name + "-transient-x", "fanout", durable=False)
    dq_args = {"x-max-priority": 5, "x-dead-letter-exchange": x}
    ch.queue_declare(q, durable=True, arguments=dq_args)
    ch.queue_declare(name + "-transient-q", durable=False)
    ch.queue_bind(q, x, "orders.#")
    ch.exchange_bind(name + "-transient-x", x, "#")
    ch.confirm_delivery()
    persistent = pika.BasicProperties(delivery_mode=2, headers={"k": "v"}, message_id="p1", priority=2)
    ch.basic_publish(x, "orders.new", b"persistent-1", persistent)
    ch.basic_publish(x, "orders.new", b"transient", pika.BasicProperties(delivery_mode=1))
    ch.basic_publish(x, "orders.new", b"persistent-2", pika.BasicProperties(delivery_mode=2))
    ch.basic_publish("", name + "-transient-q", b"gone", pika.BasicProperties(delivery_mode=2))
    m, _, body = ch.basic_get(q)  # delivered, never acked
    assert body == b"persistent-1"

    code = warren.stop()
    assert code == 0, f"SIGTERM should exit cleanly, got {code}"
    with pytest.raises((ConnectionClosedByBroker, pika.exceptions.StreamLostError)) as e:
        c.process_data_events(time_limit=1)
        c.channel()
    if isinstance(e.value, ConnectionClosedByBroker):
        assert e.value.reply_code == 320, "graceful shutdown sends connection.close 320 CONNECTION_FORCED"
    warren.start()

    c2 = connect(warren.url)
    ch = c2.channel()
    ok = ch.queue_declare(q, durable=True, passive=True).method
    assert ok.message_count == 2, "two persistent messages; the transient one is gone"
    ch.queue_declare(q, durable=True, arguments=dq_args)  # the arguments survived: equivalent
    ch.exchange_declare(x, "topic", durable=True, passive=True)
    m, props, body = ch.basic_get(q, auto_ack=True)
    assert body == b"persistent-1" and m.redelivered, "unacked before the restart: redelivered"
    assert props.headers == {"k": "v"} and props.message_id == "p1" and props.priority == 2
    assert props.delivery_mode == 2
    m, _, body = ch.basic_get(q, auto_ack=True)
    assert body == b"persistent-2" and not m.redelivered
    ch.basic_publish(x, "orders.paid", b"after-restart")
    deadline = time.time() + 3
    while (got := ch.basic_get(q, auto_ack=True))[0] is None and time.time() < deadline:
        time.sleep(0.02)
    assert got[2] == b"after-restart", "the binding survived"
    assert passive_missing(c2, lambda c: c.queue_declare(name + "-transient-q", passive=True))
    assert passive_missing(c2, lambda c: c.exchange_declare(name + "-transient-x", passive=True))
    c2.close()


def publisher(url, queue, prefix, confirmed, stop):
    """Publishes persistent messages in confirm mode until `stop` or the broker dies;
    records the ids the broker confirmed."""
    try:
        c = pika.BlockingConnection(pika.URLParameters(url))
        ch = c.channel()
        ch.confirm_delivery()
        i = 0
        while not stop.is_set():
            ch.basic_publish("", queue, f"{prefix}-{i}".encode(), pika.BasicProperties(delivery_mode=2))
            confirmed.append(f"{prefix}-{i}")  # with confirm_delivery, returns after basic.ack
            i += 1
    except Exception:
        pass  # the broker was killed


def consume_all(url, queue):
    """(body, redelivered) of every message in `queue`, by consuming with acks."""
    c = connect(url)
    ch = c.channel()
    ch.basic_qos(prefetch_count=500)
    out = []
    for m, _, body in ch.consume(queue, inactivity_timeout=2):
        if m is None:
            break
        out.append((body.decode(), m.redelivered))
        ch.basic_ack(m.delivery_tag)
    ch.cancel()
    c.close()
    return out


def test_kill_9_loses_no_confirmed_message(warren, name):
    c = connect(warren.url)
    c.channel().queue_declare(name, durable=True)
    c.close()
    confirmed = {p: [] for p in ("a", "b")}
    stop = threading.Event()
    threads = [threading.Thread(target=publisher, args=(warren.url, name, p, confirmed[p], stop)) for p in confirmed]
    for t in threads:
        t.start()
    time.sleep(1.5)
    warren.kill9()
    stop.set()
    for t in threads:
        t.join(10)
    all_confirmed = confirmed["a"] + confirmed["b"]
    assert len(all_confirmed) > 50, "publishers barely ran"

    warren.start()
    got = consume_all(warren.url, name)
    counts = Counter(body for body, _ in got)
    missing = set(all_confirmed) - set(counts)
    assert not missing, f"{len(missing)} of {len(all_confirmed)} confirmed messages lost, e.g. {sorted(missing)[:5]}"
    dups = [b for b, n in counts.items() if n > 1 and b in set(all_confirmed)]
    assert not dups, f"confirmed messages delivered twice: {dups[:5]}"
    for p, ids in confirmed.items():  # per publisher, the queue keeps publish order
        order = [b for b, _ in got if b.startswith(p + "-")]
        assert order == sorted(order, key=lambda s: int(s.split("-")[1])), p


def test_kill_9_acked_messages_come_back_only_as_redeliveries(warren, name):
    c = connect(warren.url)
    ch = c.channel()
    ch.queue_declare(name, durable=True)
    ch.confirm_delivery()
    for i in range(200):
        ch.basic_publish("", name, str(i).encode(), pika.BasicProperties(delivery_mode=2))
    acked = []
    for _ in range(100):
        m, _, body = ch.basic_get(name)
        ch.basic_ack(m.delivery_tag)
        acked.append(body.decode())
    m, _, unacked = ch.basic_get(name)  # delivered, not acked
    ch.basic_qos(prefetch_count=0)  # a synchronous round trip: the acks have been read
    # Delivery marks and acks are written without fsync (only confirms wait for one): give
    # the store writer a moment to hand them to the OS, which a kill -9 does not undo.
    time.sleep(0.3)
    warren.kill9()
    warren.start()
    got = consume_all(warren.url, name)
    bodies = [b for b, _ in got]
    assert set(bodies) >= {str(i) for i in range(100, 200)}, "every unacked message is still there"
    for body, redelivered in got:
        if body in acked or body == unacked.decode():
            assert redelivered, f"{body} was delivered before the crash: must be flagged redelivered"
    assert len(bodies) == len(set(bodies))
