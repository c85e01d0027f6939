"""Durability with the real binary: restart (SIGTERM) and crash (kill -9)."""
import threading
import time

import pika


def connect(broker):
    deadline = time.time() + 20
    while True:
        try:
            return pika.BlockingConnection(pika.URLParameters(broker.url))
        except pika.exceptions.AMQPConnectionError:
            if time.time() > deadline:
                raise
            time.sleep(0.1)


def test_restart_keeps_durable_state(warren, name):
    c = connect(warren)
    ch = c.channel()
    ch.exchange_declare(name + "-x", "topic", durable=True)
    ch.queue_declare(name, durable=True)
    ch.queue_declare(name + "-transient-q", durable=False)
    ch.queue_bind(name, name + "-x", "orders.#")
    ch.confirm_delivery()
    ch.basic_publish(name + "-x", "orders.new", b"persistent-1", pika.BasicProperties(delivery_mode=2))
    ch.basic_publish(name + "-x", "orders.new", b"transient", pika.BasicProperties(delivery_mode=1))
    ch.basic_publish(name + "-x", "orders.new", b"persistent-2", pika.BasicProperties(delivery_mode=2))
    m, _, body = ch.basic_get(name)  # delivered, never acked
    assert body == b"persistent-1"
    warren.restart()
    c2 = connect(warren)
    ch = c2.channel()
    assert ch.queue_declare(name, durable=True, passive=True).method.message_count == 2
    ch.exchange_declare(name + "-x", "topic", durable=True, passive=True)
    m, _, body = ch.basic_get(name, auto_ack=True)
    assert body == b"persistent-1" and m.redelivered
    m, _, body = ch.basic_get(name, auto_ack=True)
    assert body == b"persistent-2" and not m.redelivered
    ch.basic_publish(name + "-x", "orders.paid", b"after-restart")
    time.sleep(0.1)
    assert ch.basic_get(name, auto_ack=True)[2] == b"after-restart", "binding survived"
    try:
        c2.channel().queue_declare(name + "-transient-q", passive=True)
        raise AssertionError("a non-durable queue survived the restart")
    except pika.exceptions.ChannelClosedByBroker as e:
        assert e.reply_code == 404


def test_kill_9_loses_no_confirmed_message(warren, name):
    c = connect(warren)
    ch = c.channel()
    ch.queue_declare(name, durable=True)
    ch.confirm_delivery()
    confirmed = []
    stop = threading.Event()

    def publish():
        i = 0
        try:
            while not stop.is_set():
                ch.basic_publish("", name, str(i).encode(), pika.BasicProperties(delivery_mode=2))
                confirmed.append(i)  # confirm_delivery: returns only after basic.ack
                i += 1
        except Exception:
            pass

    t = threading.Thread(target=publish)
    t.start()
    time.sleep(1.5)
    warren.kill9()
    stop.set()
    t.join(10)
    assert len(confirmed) > 50
    warren.start()
    c2 = connect(warren)
    ch = c2.channel()
    seen = set()
    while True:
        m, _, body = ch.basic_get(name, auto_ack=True)
        if m is None:
            break
        seen.add(int(body))
    missing = set(confirmed) - seen
    assert not missing, f"{len(missing)} confirmed messages lost, e.g. {sorted(missing)[:5]}"
