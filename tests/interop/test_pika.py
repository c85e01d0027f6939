"""AMQP 0-9-1 behaviour with pika, the client most Python services use.

Every test also passes against RabbitMQ (AMQP_URL=amqp://guest:guest@127.0.0.1:5680/).
"""
import time

import pika
import pytest
from pika.exceptions import ChannelClosedByBroker, ProbableAuthenticationError


def drain(ch, queue, limit=1000):
    out = []
    for _ in range(limit):
        method, props, body = ch.basic_get(queue, auto_ack=True)
        if method is None:
            break
        out.append(body)
    return out


def test_publish_consume_ack(ch, name):
    ch.queue_declare(name)
    for i in range(50):
        ch.basic_publish("", name, f"m{i}".encode(), pika.BasicProperties(message_id=f"id{i}", content_type="text/plain", headers={"k": "v", "n": 7}))
    got = []
    for method, props, body in ch.consume(name, inactivity_timeout=2):
        if method is None:
            break
        assert props.headers == {"k": "v", "n": 7}
        got.append((body, props.message_id))
        ch.basic_ack(method.delivery_tag)
        if len(got) == 50:
            break
    ch.cancel()
    assert got == [(f"m{i}".encode(), f"id{i}") for i in range(50)]


def test_server_capabilities(conn):
    caps = conn._impl.server_capabilities
    for cap in ["publisher_confirms", "exchange_exchange_bindings", "basic.nack", "consumer_cancel_notify",
                "connection.blocked", "authentication_failure_close", "per_consumer_qos", "direct_reply_to"]:
        assert caps.get(cap) is True, cap


def test_basic_get_counts(ch, name):
    ch.queue_declare(name)
    for i in range(3):
        ch.basic_publish("", name, b"x")
    time.sleep(0.1)
    method, _, _ = ch.basic_get(name)
    assert method.message_count == 2
    ch.basic_ack(method.delivery_tag)
    assert ch.queue_declare(name, passive=True).method.message_count == 2


def test_prefetch_limits_unacked(conn, ch, name):
    ch.queue_declare(name)
    for i in range(10):
        ch.basic_publish("", name, str(i).encode())
    ch.basic_qos(prefetch_count=2)
    got = []
    ch.basic_consume(name, lambda c, m, p, b: got.append(m))
    pump(conn, lambda: len(got) >= 2)
    assert len(got) == 2
    ch.basic_ack(got[1].delivery_tag, multiple=True)
    pump(conn, lambda: len(got) >= 4)
    assert len(got) == 4


def test_nack_requeue_sets_redelivered(ch, name):
    ch.queue_declare(name)
    ch.basic_publish("", name, b"again")
    m, _, _ = ch.basic_get(name)
    assert not m.redelivered
    ch.basic_nack(m.delivery_tag, requeue=True)
    m2, _, body = ch.basic_get(name)
    assert m2.redelivered and body == b"again"
    ch.basic_reject(m2.delivery_tag, requeue=True)
    m3, _, _ = ch.basic_get(name, auto_ack=True)
    assert m3.redelivered


def pump(conn, until, seconds=2.0):
    """Processes events until `until()` holds (or time runs out), then a little longer so
    extra deliveries would show."""
    deadline = time.time() + seconds
    while not until() and time.time() < deadline:
        conn.process_data_events(time_limit=0.05)
    conn.process_data_events(time_limit=0.2)


def x_death(props):
    return props.headers["x-death"][0]


def test_reject_dead_letters_with_x_death(ch, name):
    ch.exchange_declare(name + "-dlx", "direct")
    ch.queue_declare(name + "-dead")
    ch.queue_bind(name + "-dead", name + "-dlx", "rk")
    ch.queue_declare(name, arguments={"x-dead-letter-exchange": name + "-dlx"})
    ch.basic_publish("", name, b"bad", pika.BasicProperties(headers={"h": 1}))
    # routing key of the original publish is the queue name; bind it too
    ch.queue_bind(name + "-dead", name + "-dlx", name)
    m, _, _ = ch.basic_get(name)
    ch.basic_reject(m.delivery_tag, requeue=False)
    time.sleep(0.2)
    m, props, body = ch.basic_get(name + "-dead", auto_ack=True)
    assert body == b"bad"
    d = x_death(props)
    assert d["reason"] == "rejected"
    assert d["queue"] == name
    assert d["exchange"] == ""
    assert d["routing-keys"] == [name]
    assert d["count"] == 1
    assert props.headers["x-first-death-reason"] == "rejected"
    assert props.headers["x-first-death-queue"] == name
    assert props.headers["h"] == 1


def test_queue_ttl_dead_letters_expired(ch, name):
    ch.queue_declare(name + "-dead")
    ch.queue_declare(name, arguments={"x-message-ttl": 100, "x-dead-letter-exchange": "", "x-dead-letter-routing-key": name + "-dead"})
    ch.basic_publish("", name, b"old")
    time.sleep(0.6)
    m, props, body = ch.basic_get(name + "-dead", auto_ack=True)
    assert body == b"old"
    assert x_death(props)["reason"] == "expired"
    assert ch.queue_declare(name, passive=True).method.message_count == 0


def test_per_message_expiration(ch, name):
    ch.queue_declare(name)
    ch.basic_publish("", name, b"short", pika.BasicProperties(expiration="50"))
    ch.basic_publish("", name, b"long", pika.BasicProperties(expiration="60000"))
    time.sleep(0.3)
    assert drain(ch, name) == [b"long"]


def test_max_length_drop_head_dead_letters_maxlen(ch, name):
    ch.queue_declare(name + "-dead")
    ch.queue_declare(name, arguments={"x-max-length": 2, "x-dead-letter-exchange": "", "x-dead-letter-routing-key": name + "-dead"})
    for b in [b"1", b"2", b"3"]:
        ch.basic_publish("", name, b)
    time.sleep(0.2)
    assert drain(ch, name) == [b"2", b"3"]
    m, props, body = ch.basic_get(name + "-dead", auto_ack=True)
    assert body == b"1" and x_death(props)["reason"] == "maxlen"


def test_max_length_reject_publish_nacks(ch, name):
    ch.queue_declare(name, arguments={"x-max-length": 1, "x-overflow": "reject-publish"})
    ch.confirm_delivery()
    ch.basic_publish("", name, b"1")
    with pytest.raises(pika.exceptions.NackError):
        ch.basic_publish("", name, b"2")
    assert drain(ch, name) == [b"1"]


def test_priority_queue(ch, name):
    ch.queue_declare(name, arguments={"x-max-priority": 5})
    for body, p in [(b"low", 1), (b"high", 5), (b"none", None), (b"mid", 3)]:
        ch.basic_publish("", name, body, pika.BasicProperties(priority=p))
    time.sleep(0.1)
    assert drain(ch, name) == [b"high", b"mid", b"low", b"none"]


def test_exclusive_queue_from_other_connection_is_405(broker, ch, name):
    ch.queue_declare(name, exclusive=True)
    other = pika.BlockingConnection(pika.URLParameters(broker.url))
    try:
        with pytest.raises(ChannelClosedByBroker) as e:
            other.channel().queue_declare(name)
        assert e.value.reply_code == 405
        assert e.value.reply_text.startswith("RESOURCE_LOCKED")
    finally:
        other.close()


def test_passive_declare_missing_is_404(conn, name):
    with pytest.raises(ChannelClosedByBroker) as e:
        conn.channel().queue_declare(name, passive=True)
    assert e.value.reply_code == 404
    assert e.value.reply_text == f"NOT_FOUND - no queue '{name}' in vhost '/'"


def test_inequivalent_redeclare_is_406(conn, name):
    ch = conn.channel()
    ch.queue_declare(name, durable=False)
    with pytest.raises(ChannelClosedByBroker) as e:
        ch.queue_declare(name, durable=True)
    assert e.value.reply_code == 406
    assert "inequivalent arg 'durable'" in e.value.reply_text
    ch = conn.channel()
    ch.exchange_declare(name, "direct")
    with pytest.raises(ChannelClosedByBroker) as e:
        ch.exchange_declare(name, "fanout")
    assert e.value.reply_code == 406
    conn.channel().queue_delete(name)


def test_exchange_types(ch, name):
    ch.exchange_declare(name + "-t", "topic")
    ch.exchange_declare(name + "-f", "fanout")
    ch.exchange_declare(name + "-h", "headers")
    for q in ["star", "hash", "fan1", "fan2", "hall", "hany"]:
        ch.queue_declare(name + q)
    ch.queue_bind(name + "star", name + "-t", "a.*.c")
    ch.queue_bind(name + "hash", name + "-t", "a.#")
    ch.queue_bind(name + "fan1", name + "-f")
    ch.queue_bind(name + "fan2", name + "-f")
    ch.queue_bind(name + "hall", name + "-h", arguments={"x-match": "all", "a": "1", "b": "2"})
    ch.queue_bind(name + "hany", name + "-h", arguments={"x-match": "any", "a": "1", "b": "2"})
    ch.basic_publish(name + "-t", "a.b.c", b"abc")
    ch.basic_publish(name + "-t", "a", b"a")
    ch.basic_publish(name + "-f", "ignored", b"fan")
    ch.basic_publish(name + "-h", "", b"one", pika.BasicProperties(headers={"a": "1"}))
    ch.basic_publish(name + "-h", "", b"both", pika.BasicProperties(headers={"a": "1", "b": "2"}))
    time.sleep(0.2)
    assert drain(ch, name + "star") == [b"abc"]
    assert drain(ch, name + "hash") == [b"abc", b"a"]
    assert drain(ch, name + "fan1") == [b"fan"]
    assert drain(ch, name + "fan2") == [b"fan"]
    assert drain(ch, name + "hall") == [b"both"]
    assert drain(ch, name + "hany") == [b"one", b"both"]


def test_exchange_to_exchange_and_alternate(ch, name):
    ch.exchange_declare(name + "-ae", "fanout")
    ch.exchange_declare(name + "-src", "direct", arguments={"alternate-exchange": name + "-ae"})
    ch.exchange_declare(name + "-dst", "fanout")
    ch.exchange_bind(name + "-dst", name + "-src", "k")
    ch.queue_declare(name + "e2e")
    ch.queue_declare(name + "alt")
    ch.queue_bind(name + "e2e", name + "-dst")
    ch.queue_bind(name + "alt", name + "-ae")
    ch.basic_publish(name + "-src", "k", b"routed")
    ch.basic_publish(name + "-src", "zzz", b"unroutable")
    time.sleep(0.2)
    assert drain(ch, name + "e2e") == [b"routed"]
    assert drain(ch, name + "alt") == [b"unroutable"]


def test_mandatory_unroutable_is_returned(conn, ch, name):
    returned = []
    ch.add_on_return_callback(lambda c, m, p, b: returned.append((m.reply_code, m.reply_text, b)))
    ch.basic_publish("", name + "-nowhere", b"lost", mandatory=True)
    pump(conn, lambda: returned)
    assert returned == [(312, "NO_ROUTE", b"lost")]


def test_publisher_confirms_persistent(ch, name):
    ch.queue_declare(name, durable=True)
    ch.confirm_delivery()
    for i in range(100):
        ch.basic_publish("", name, str(i).encode(), pika.BasicProperties(delivery_mode=2))
    assert ch.queue_declare(name, durable=True, passive=True).method.message_count == 100
    ch.queue_delete(name)


def test_tx_commit_and_rollback(ch, name):
    ch.queue_declare(name)
    ch.tx_select()
    ch.basic_publish("", name, b"rolled-back")
    ch.tx_rollback()
    ch.basic_publish("", name, b"committed")
    ch.tx_commit()
    assert drain(ch, name) == [b"committed"]


def test_recover_requeues_unacked(ch, name):
    ch.queue_declare(name)
    ch.basic_publish("", name, b"r")
    m, _, _ = ch.basic_get(name)
    ch.basic_recover(requeue=True)
    m2, _, body = ch.basic_get(name, auto_ack=True)
    assert body == b"r" and m2.redelivered


def test_consumer_cancel_notification_on_queue_delete(broker, conn, ch, name):
    ch.queue_declare(name)
    cancelled = []
    ch.add_on_cancel_callback(lambda frame: cancelled.append(frame.method.consumer_tag))
    tag = ch.basic_consume(name, lambda *a: None)
    other = pika.BlockingConnection(pika.URLParameters(broker.url))
    other.channel().queue_delete(name)
    other.close()
    pump(conn, lambda: cancelled)
    assert cancelled == [tag]


def test_single_active_consumer(conn, ch, name):
    ch.queue_declare(name, arguments={"x-single-active-consumer": True})
    a, b = [], []
    ch.basic_consume(name, lambda c, m, p, body: a.append(body), auto_ack=True)
    ch.basic_consume(name, lambda c, m, p, body: b.append(body), auto_ack=True)
    for i in range(5):
        ch.basic_publish("", name, str(i).encode())
    pump(conn, lambda: len(a) + len(b) >= 5)
    assert len(a) == 5 and b == []


def test_consumer_priority(conn, ch, name):
    ch.queue_declare(name)
    low, high = [], []
    ch.basic_consume(name, lambda c, m, p, body: low.append(body), auto_ack=True, arguments={"x-priority": 1})
    ch.basic_consume(name, lambda c, m, p, body: high.append(body), auto_ack=True, arguments={"x-priority": 5})
    for i in range(5):
        ch.basic_publish("", name, str(i).encode())
    pump(conn, lambda: len(high) + len(low) >= 5)
    assert len(high) == 5 and low == []


def test_direct_reply_to_rpc(broker, conn, ch, name):
    ch.queue_declare(name)
    server = pika.BlockingConnection(pika.URLParameters(broker.url))
    sch = server.channel()
    replies = []
    ch.basic_consume("amq.rabbitmq.reply-to", lambda c, m, p, b: replies.append((b, p.correlation_id)), auto_ack=True)
    ch.basic_publish("", name, b"ping", pika.BasicProperties(reply_to="amq.rabbitmq.reply-to", correlation_id="42"))
    m = None
    for _ in range(20):
        m, props, body = sch.basic_get(name, auto_ack=True)
        if m:
            break
        time.sleep(0.05)
    assert m and props.reply_to.startswith("amq.rabbitmq.reply-to.")
    sch.basic_publish("", props.reply_to, b"pong", pika.BasicProperties(correlation_id=props.correlation_id))
    pump(conn, lambda: replies)
    server.close()
    assert replies == [(b"pong", "42")]


def test_server_named_queue(ch):
    q = ch.queue_declare("", exclusive=True).method.queue
    assert q.startswith("amq.gen-")


def test_purge_and_delete_conditions(conn, ch, name):
    ch.queue_declare(name)
    for _ in range(3):
        ch.basic_publish("", name, b"x")
    time.sleep(0.1)
    assert ch.queue_purge(name).method.message_count == 3
    ch.basic_publish("", name, b"x")
    time.sleep(0.1)
    with pytest.raises(ChannelClosedByBroker) as e:
        ch.queue_delete(name, if_empty=True)
    assert e.value.reply_code == 406
    assert conn.channel().queue_delete(name).method.message_count == 1


def test_wrong_password_refused(broker):
    params = pika.URLParameters(broker.url.replace("guest:guest", "guest:wrong"))
    with pytest.raises(ProbableAuthenticationError):
        pika.BlockingConnection(params)


def test_heartbeat_negotiated(broker):
    params = pika.URLParameters(broker.url)
    params.heartbeat = 5
    c = pika.BlockingConnection(params)
    assert c._impl.params.heartbeat == 5
    c.close()
