"""Consumers, acknowledgements, queue lifetimes, message properties and connection-level
behaviour (heartbeats, many channels), as RabbitMQ does them."""
import datetime
import decimal
import time

import pika
import pytest
from pika.compat import long
from pika.exceptions import ChannelClosedByBroker

from amqp_helpers import drain, get, pump, wait_ready


def test_global_qos_is_shared_by_the_channels_consumers(conn, ch, name):
    for q in ["a", "b"]:
        ch.queue_declare(name + q)
        for i in range(5):
            ch.basic_publish("", name + q, b"x")
    ch.basic_qos(prefetch_count=3, global_qos=True)
    got = []
    ch.basic_consume(name + "a", lambda c, m, p, b: got.append(m))
    ch.basic_consume(name + "b", lambda c, m, p, b: got.append(m))
    pump(conn, lambda: len(got) >= 3)
    assert len(got) == 3
    ch.basic_ack(got[-1].delivery_tag, multiple=True)
    pump(conn, lambda: len(got) >= 6)
    assert len(got) == 6


def test_per_consumer_and_global_qos_combine(conn, ch, name):
    ch.queue_declare(name)
    for i in range(10):
        ch.basic_publish("", name, b"x")
    ch.basic_qos(prefetch_count=2, global_qos=False)
    ch.basic_qos(prefetch_count=5, global_qos=True)
    got = []
    for _ in range(3):
        ch.basic_consume(name, lambda c, m, p, b: got.append(m))
    pump(conn, lambda: len(got) >= 5)
    assert len(got) == 5, "3 consumers x 2 each, capped at 5 for the channel"


def test_requeue_keeps_original_order(ch, name):
    ch.queue_declare(name)
    for i in range(5):
        ch.basic_publish("", name, str(i).encode())
    wait_ready(ch, name, 5)
    tags = [ch.basic_get(name)[0].delivery_tag for _ in range(3)]
    for t in [tags[1], tags[0], tags[2]]:
        ch.basic_nack(t, requeue=True)
    assert drain(ch, name) == [b"0", b"1", b"2", b"3", b"4"]


def test_nack_multiple_requeue(ch, name):
    ch.queue_declare(name)
    for i in range(4):
        ch.basic_publish("", name, str(i).encode())
    wait_ready(ch, name, 4)
    tags = [ch.basic_get(name)[0].delivery_tag for _ in range(3)]
    ch.basic_ack(tags[0])
    ch.basic_nack(tags[2], multiple=True, requeue=True)
    out = []
    while True:
        m, _, b = ch.basic_get(name, auto_ack=True)
        if m is None:
            break
        out.append((b, m.redelivered))
    assert out == [(b"1", True), (b"2", True), (b"3", False)]


def test_channel_close_requeues_unacked(conn, name):
    ch = conn.channel()
    ch.queue_declare(name)
    ch.basic_publish("", name, b"u")
    ch.basic_publish("", name, b"acked")
    get(ch, name, auto_ack=False)
    m, _, _ = ch.basic_get(name)
    ch.basic_ack(m.delivery_tag)
    ch.close()
    m, _, body = get(conn.channel(), name)
    assert body == b"u" and m.redelivered


def test_connection_close_requeues_unacked(broker, ch, name):
    ch.queue_declare(name)
    ch.basic_publish("", name, b"u")
    wait_ready(ch, name, 1)
    other = pika.BlockingConnection(pika.URLParameters(broker.url))
    got = []
    och = other.channel()
    och.basic_consume(name, lambda c, m, p, b: got.append(b))
    pump(other, lambda: got)
    assert got == [b"u"]
    other.close()
    m, _, body = get(ch, name)
    assert body == b"u" and m.redelivered


def test_cancel_stops_deliveries_but_unacked_can_still_be_acked(conn, ch, name):
    ch.queue_declare(name)
    ch.basic_qos(prefetch_count=1)
    got = []
    tag = ch.basic_consume(name, lambda c, m, p, b: got.append(m))
    ch.basic_publish("", name, b"1")
    ch.basic_publish("", name, b"2")
    pump(conn, lambda: got)
    ch.basic_cancel(tag)
    ch.basic_ack(got[0].delivery_tag)
    pump(conn, lambda: False, seconds=0.2)
    assert len(got) == 1
    assert ch.queue_declare(name, passive=True).method.message_count == 1


def test_single_active_consumer_fails_over_in_order_when_its_connection_closes(broker, conn, ch, name):
    ch.queue_declare(name, arguments={"x-single-active-consumer": True})
    first = pika.BlockingConnection(pika.URLParameters(broker.url))
    fch = first.channel()
    fch.basic_qos(prefetch_count=1)
    a, b = [], []
    fch.basic_consume(name, lambda c, m, p, body: a.append(body))
    pump(first, lambda: False, seconds=0.1)
    ch.basic_consume(name, lambda c, m, p, body: b.append((body, m.redelivered)))
    for i in range(3):
        ch.basic_publish("", name, str(i).encode())
    pump(first, lambda: a)
    pump(conn, lambda: False, seconds=0.2)
    assert a == [b"0"] and b == [], "only the active consumer gets messages"
    first.close()
    pump(conn, lambda: len(b) >= 3)
    # the unacked message is requeued to its place before the next consumer takes over
    assert b == [(b"0", True), (b"1", False), (b"2", False)]


def test_exclusive_queue_is_deleted_with_its_connection(broker, ch, name):
    other = pika.BlockingConnection(pika.URLParameters(broker.url))
    other.channel().queue_declare(name, exclusive=True)
    other.close()
    deadline = time.time() + 3
    while True:
        try:
            ch.connection.channel().queue_declare(name, passive=True)
        except ChannelClosedByBroker as e:
            assert e.reply_code == 404
            break
        assert time.time() < deadline, "exclusive queue outlived its connection"
        time.sleep(0.05)


def gone(conn, fn):
    try:
        fn(conn.channel())
        return False
    except ChannelClosedByBroker as e:
        assert e.reply_code == 404
        return True


def test_auto_delete_queue_goes_with_its_last_consumer(conn, ch, name):
    ch.queue_declare(name, auto_delete=True)
    assert not gone(conn, lambda c: c.queue_declare(name, passive=True)), "never consumed: stays"
    t1 = ch.basic_consume(name, lambda *a: None)
    t2 = ch.basic_consume(name, lambda *a: None)
    ch.basic_cancel(t1)
    assert not gone(conn, lambda c: c.queue_declare(name, passive=True)), "one consumer left"
    ch.basic_cancel(t2)
    assert gone(conn, lambda c: c.queue_declare(name, passive=True))


def test_x_expires_deletes_an_unused_queue(conn, ch, name):
    ch.queue_declare(name, arguments={"x-expires": 300})
    ch.queue_declare(name + "-used", arguments={"x-expires": 300})
    tag = ch.basic_consume(name + "-used", lambda *a: None)
    conn.sleep(1.0)
    assert gone(conn, lambda c: c.queue_declare(name, passive=True))
    assert not gone(conn, lambda c: c.queue_declare(name + "-used", passive=True)), "a consumer keeps it"
    ch.basic_cancel(tag)


def test_auto_delete_exchange_goes_with_its_last_binding(conn, ch, name):
    ch.exchange_declare(name, "direct", auto_delete=True)
    ch.queue_declare(name)
    ch.queue_bind(name, name, "a")
    ch.queue_bind(name, name, "b")
    ch.queue_unbind(name, name, "a")
    assert not gone(conn, lambda c: c.exchange_declare(name, passive=True))
    ch.queue_unbind(name, name, "b")
    assert gone(conn, lambda c: c.exchange_declare(name, passive=True))


def test_all_properties_and_field_types_round_trip(ch, name):
    ch.queue_declare(name)
    headers = {"s": "str", "i": 7, "neg": -5, "big": 2 ** 40, "b": True, "n": None, "l": [1, "a", [2]],
               "t": {"x": {"y": 1}}, "bytes": b"\x00\x01", "d": decimal.Decimal("1.25"),
               "ts": datetime.datetime(2020, 1, 2, 3, 4, 5), "utf8": "żółw"}
    props = pika.BasicProperties(
        content_type="application/json", content_encoding="gzip", headers=headers, delivery_mode=2,
        priority=3, correlation_id="corr", reply_to="rt", expiration="60000", message_id="mid",
        timestamp=1700000000, type="tp", user_id="guest", app_id="app")
    ch.basic_publish("", name, b"body", props)
    m, got, body = get(ch, name)
    assert body == b"body"
    for field in ["content_type", "content_encoding", "delivery_mode", "priority", "correlation_id", "reply_to",
                  "expiration", "message_id", "timestamp", "type", "user_id", "app_id"]:
        assert getattr(got, field) == getattr(props, field), field
    assert got.headers == headers
    assert isinstance(got.headers["big"], long)


@pytest.mark.parametrize("size", [0, 1, 131072 - 8, 131072, 1_000_000, 4_000_000])
def test_body_sizes_across_frame_boundaries(ch, name, size):
    ch.queue_declare(name)
    body = bytes(i % 251 for i in range(size))
    ch.basic_publish("", name, body)
    assert get(ch, name)[2] == body


def test_many_channels_on_one_connection(conn, name):
    chans = [conn.channel() for _ in range(100)]
    chans[0].queue_declare(name)
    for i, c in enumerate(chans):
        c.basic_publish("", name, str(i).encode())
    assert wait_ready(chans[0], name, 100) == 100
    for c in chans[1:]:
        c.close()
    assert sorted(int(b) for b in drain(chans[0], name)) == list(range(100))


def test_server_sends_heartbeats(broker):
    params = pika.URLParameters(broker.url)
    params.heartbeat = 1
    c = pika.BlockingConnection(params)
    c.sleep(2.5)  # pika answers heartbeats while it processes events
    assert c._impl._heartbeat_checker._heartbeat_frames_received >= 1
    assert c.is_open
    c.channel().close()
    c.close()


def test_silent_client_is_disconnected_after_missed_heartbeats(broker):
    params = pika.URLParameters(broker.url)
    params.heartbeat = 1
    c = pika.BlockingConnection(params)
    time.sleep(4.5)  # no event processing: pika sends no heartbeats
    with pytest.raises(pika.exceptions.AMQPConnectionError):
        c.channel()
        c.process_data_events(time_limit=0.5)
