"""AMQP 0-9-1 behaviour with pika, the client most Python services use: the features of
the README's compatibility table, one test each.

Every test passes against RabbitMQ (AMQP_URL=amqp://guest:guest@127.0.0.1:5680/%2F).
Error codes and reply texts are in test_pika_errors.py, dead-lettering in
test_pika_deadletter.py, routing edge cases in test_pika_routing.py, consumers and
connection-level behaviour in test_pika_consumers.py.
"""
import pika
import pytest
from pika.exceptions import ChannelClosedByBroker, ProbableAuthenticationError

from amqp_helpers import drain, get, pump, wait_ready


def test_publish_consume_ack(ch, name):
    ch.queue_declare(name)
    for i in range(50):
        ch.basic_publish("", name, f"m{i}".encode(), pika.BasicProperties(
            message_id=f"id{i}", content_type="text/plain", headers={"k": "v", "n": 7}))
    got = []
    for method, props, body in ch.consume(name, inactivity_timeout=2):
        if method is None:
            break
        assert props.headers == {"k": "v", "n": 7}
        assert props.content_type == "text/plain"
        assert method.routing_key == name and method.exchange == ""
        got.append((body, props.message_id))
        ch.basic_ack(method.delivery_tag)
        if len(got) == 50:
            break
    ch.cancel()
    assert got == [(f"m{i}".encode(), f"id{i}") for i in range(50)]
    assert ch.queue_declare(name, passive=True).method.message_count == 0


def test_headers_keep_their_order_and_types(ch, name):
    """RabbitMQ passes the content header through: a header table arrives in the order
    the publisher wrote it (pika keeps dict order both ways), with its field types."""
    ch.queue_declare(name)
    headers = {"zeta": 1, "alpha": "two", "mid": {"y": 1, "b": 2}, "list": [3, "x"], "big": 2 ** 40}
    ch.basic_publish("", name, b"x", pika.BasicProperties(headers=headers, app_id="a", priority=3))
    method, props, body = get(ch, name)
    assert list(props.headers) == ["zeta", "alpha", "mid", "list", "big"]
    assert list(props.headers["mid"]) == ["y", "b"]
    assert props.headers == headers
    assert (props.app_id, props.priority) == ("a", 3)


def test_server_capabilities(conn):
    props = conn._impl.server_properties
    for key in ["product", "version", "platform", "copyright", "information"]:
        assert key in props, key
    # RabbitMQ's product name: clients switch its extensions on by it.
    assert props["product"] in (b"RabbitMQ", "RabbitMQ")
    assert tuple(int(x) for x in (props["version"].decode() if isinstance(props["version"], bytes) else props["version"]).split(".")[:2]) >= (3, 10)
    caps = props["capabilities"]
    for cap in ["publisher_confirms", "exchange_exchange_bindings", "basic.nack", "consumer_cancel_notify",
                "connection.blocked", "authentication_failure_close", "per_consumer_qos", "direct_reply_to",
                "consumer_priorities"]:
        assert caps.get(cap) is True, cap


def test_basic_get_counts(ch, name):
    ch.queue_declare(name)
    assert ch.basic_get(name) == (None, None, None)
    for i in range(3):
        ch.basic_publish("", name, str(i).encode())
    wait_ready(ch, name, 3)
    method, _, body = ch.basic_get(name)
    assert body == b"0"
    assert method.message_count == 2
    assert not method.redelivered
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
    ch.basic_ack(got[0].delivery_tag)
    pump(conn, lambda: len(got) >= 3)
    assert len(got) == 3, "one ack frees exactly one slot"
    ch.basic_ack(got[2].delivery_tag, multiple=True)
    pump(conn, lambda: len(got) >= 5)
    assert len(got) == 5
    declare = ch.queue_declare(name, passive=True).method
    assert declare.message_count == 5 and declare.consumer_count == 1


def test_nack_requeue_sets_redelivered(ch, name):
    ch.queue_declare(name)
    ch.basic_publish("", name, b"again")
    m, _, _ = get(ch, name, auto_ack=False)
    assert not m.redelivered
    ch.basic_nack(m.delivery_tag, requeue=True)
    m2, _, body = ch.basic_get(name)
    assert m2.redelivered and body == b"again"
    ch.basic_reject(m2.delivery_tag, requeue=True)
    m3, _, _ = ch.basic_get(name, auto_ack=True)
    assert m3.redelivered


def test_per_message_expiration(ch, name):
    ch.queue_declare(name)
    ch.basic_publish("", name, b"short", pika.BasicProperties(expiration="50"))
    ch.basic_publish("", name, b"long", pika.BasicProperties(expiration="60000"))
    ch.basic_publish("", name, b"none")
    ch.connection.sleep(0.3)
    m, props, body = ch.basic_get(name, auto_ack=True)
    assert body == b"long" and props.expiration == "60000"
    assert drain(ch, name) == [b"none"]


def test_queue_ttl_expires_messages(ch, name):
    ch.queue_declare(name, arguments={"x-message-ttl": 100})
    ch.basic_publish("", name, b"old")
    assert wait_ready(ch, name, 1) == 1
    ch.connection.sleep(0.4)
    assert ch.queue_declare(name, passive=True).method.message_count == 0
    ch.basic_publish("", name, b"fresh")
    assert get(ch, name)[2] == b"fresh"


def test_max_length_drop_head(ch, name):
    ch.queue_declare(name, arguments={"x-max-length": 2})
    for b in [b"1", b"2", b"3"]:
        ch.basic_publish("", name, b)
    wait_ready(ch, name, 2)
    assert drain(ch, name) == [b"2", b"3"]


def test_max_length_reject_publish_nacks(ch, name):
    ch.queue_declare(name, arguments={"x-max-length": 1, "x-overflow": "reject-publish"})
    ch.confirm_delivery()
    ch.basic_publish("", name, b"1")
    with pytest.raises(pika.exceptions.NackError):
        ch.basic_publish("", name, b"2")
    assert drain(ch, name) == [b"1"]
    ch.basic_publish("", name, b"3")  # room again: acked
    assert drain(ch, name) == [b"3"]


def test_priority_queue(ch, name):
    ch.queue_declare(name, arguments={"x-max-priority": 5})
    for body, p in [(b"low", 1), (b"high", 5), (b"none", None), (b"mid", 3), (b"above-max", 9), (b"high2", 5)]:
        ch.basic_publish("", name, body, pika.BasicProperties(priority=p))
    wait_ready(ch, name, 6)
    # above x-max-priority counts as the maximum; equal priorities stay FIFO
    assert drain(ch, name) == [b"high", b"above-max", b"high2", b"mid", b"low", b"none"]


def test_exclusive_queue_from_other_connection_is_405(broker, ch, name):
    ch.queue_declare(name, exclusive=True)
    other = pika.BlockingConnection(pika.URLParameters(broker.url))
    try:
        with pytest.raises(ChannelClosedByBroker) as e:
            other.channel().queue_declare(name)
        assert e.value.reply_code == 405
        assert e.value.reply_text == (
            f"RESOURCE_LOCKED - cannot obtain exclusive access to locked queue '{name}' in vhost '/'. "
            "It could be originally declared on another connection or the exclusive property value "
            "does not match that of the original declaration.")
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
    ch.queue_declare(name, durable=False)  # an equivalent re-declare is fine
    with pytest.raises(ChannelClosedByBroker) as e:
        ch.queue_declare(name, durable=True)
    assert e.value.reply_code == 406
    assert e.value.reply_text == (
        f"PRECONDITION_FAILED - inequivalent arg 'durable' for queue '{name}' in vhost '/': "
        "received 'true' but current is 'false'")
    ch = conn.channel()
    ch.exchange_declare(name, "direct")
    with pytest.raises(ChannelClosedByBroker) as e:
        ch.exchange_declare(name, "fanout")
    assert e.value.reply_code == 406
    assert e.value.reply_text == (
        f"PRECONDITION_FAILED - inequivalent arg 'type' for exchange '{name}' in vhost '/': "
        "received 'fanout' but current is 'direct'")


def test_direct_exchange(ch, name):
    x = name + "-d"
    ch.exchange_declare(x, "direct")
    for q in ["a", "b"]:
        ch.queue_declare(name + q)
    ch.queue_bind(name + "a", x, "red")
    ch.queue_bind(name + "a", x, "green")
    ch.queue_bind(name + "b", x, "red")
    for key in ["red", "green", "blue"]:
        ch.basic_publish(x, key, key.encode())
    wait_ready(ch, name + "a", 2)
    assert drain(ch, name + "a") == [b"red", b"green"]
    assert drain(ch, name + "b") == [b"red"]
    ch.queue_unbind(name + "a", x, "red")
    ch.basic_publish(x, "red", b"red2")
    wait_ready(ch, name + "b", 1)
    assert drain(ch, name + "a") == []
    assert drain(ch, name + "b") == [b"red2"]


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
    ch.basic_publish(name + "-t", "a.b.b.c", b"abbc")
    ch.basic_publish(name + "-f", "ignored", b"fan")
    ch.basic_publish(name + "-h", "", b"one", pika.BasicProperties(headers={"a": "1"}))
    ch.basic_publish(name + "-h", "", b"both", pika.BasicProperties(headers={"a": "1", "b": "2"}))
    ch.basic_publish(name + "-h", "", b"wrong", pika.BasicProperties(headers={"a": "2", "b": "3"}))
    wait_ready(ch, name + "hany", 2)
    assert drain(ch, name + "star") == [b"abc"]
    assert drain(ch, name + "hash") == [b"abc", b"a", b"abbc"]
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
    wait_ready(ch, name + "alt", 1)
    assert drain(ch, name + "e2e") == [b"routed"]
    assert drain(ch, name + "alt") == [b"unroutable"]
    ch.exchange_unbind(name + "-dst", name + "-src", "k")
    ch.basic_publish(name + "-src", "k", b"after-unbind")
    wait_ready(ch, name + "alt", 1)
    assert drain(ch, name + "e2e") == []
    assert drain(ch, name + "alt") == [b"after-unbind"]


def test_mandatory_unroutable_is_returned(conn, ch, name):
    returned = []
    ch.add_on_return_callback(lambda c, m, p, b: returned.append((m.reply_code, m.reply_text, m.exchange, m.routing_key, b)))
    ch.basic_publish("", name + "-nowhere", b"lost", mandatory=True)
    ch.basic_publish("", name + "-nowhere", b"dropped")  # not mandatory: silently dropped
    pump(conn, lambda: returned)
    assert returned == [(312, "NO_ROUTE", "", name + "-nowhere", b"lost")]


def test_mandatory_with_confirms_returns_then_acks(ch, name):
    ch.confirm_delivery()
    with pytest.raises(pika.exceptions.UnroutableError) as e:
        ch.basic_publish("", name + "-nowhere", b"lost", mandatory=True)
    assert e.value.messages[0].method.reply_code == 312
    ch.basic_publish("", name + "-nowhere", b"dropped")  # unroutable, not mandatory: acked


def test_publisher_confirms_persistent(ch, name):
    ch.queue_declare(name, durable=True)
    ch.confirm_delivery()
    for i in range(100):
        ch.basic_publish("", name, str(i).encode(), pika.BasicProperties(delivery_mode=2))
    assert ch.queue_declare(name, durable=True, passive=True).method.message_count == 100
    assert drain(ch, name) == [str(i).encode() for i in range(100)]


def test_tx_commit_and_rollback(ch, name):
    ch.queue_declare(name)
    ch.tx_select()
    ch.basic_publish("", name, b"rolled-back")
    ch.tx_rollback()
    assert ch.queue_declare(name, passive=True).method.message_count == 0
    ch.basic_publish("", name, b"committed")
    assert ch.queue_declare(name, passive=True).method.message_count == 0, "visible before commit"
    ch.tx_commit()
    assert drain(ch, name) == [b"committed"]
    ch.tx_commit()  # drain's acks were auto-acks; an empty commit is fine


def test_tx_ack_rollback_keeps_message_unacked(conn, name):
    ch = conn.channel()
    ch.queue_declare(name)
    ch.basic_publish("", name, b"m")
    wait_ready(ch, name, 1)
    ch.tx_select()
    m, _, _ = ch.basic_get(name)
    ch.basic_ack(m.delivery_tag)
    ch.tx_rollback()
    ch.close()  # the ack was rolled back: closing the channel requeues the message
    ch = conn.channel()
    m, _, body = get(ch, name)
    assert body == b"m" and m.redelivered
    ch.basic_publish("", name, b"n")
    ch.tx_select()
    m, _, _ = get(ch, name, auto_ack=False)
    ch.basic_ack(m.delivery_tag)
    ch.tx_commit()
    ch.close()
    assert conn.channel().queue_declare(name, passive=True).method.message_count == 0


def test_recover_requeues_unacked(ch, name):
    ch.queue_declare(name)
    ch.basic_publish("", name, b"r")
    m, _, _ = get(ch, name, auto_ack=False)
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
    assert ch.is_open, "the channel stays open after a server-side cancel"


def test_single_active_consumer(conn, ch, name):
    ch.queue_declare(name, arguments={"x-single-active-consumer": True})
    a, b = [], []
    ch.basic_consume(name, lambda c, m, p, body: a.append(body), auto_ack=True)
    ch.basic_consume(name, lambda c, m, p, body: b.append(body), auto_ack=True)
    for i in range(5):
        ch.basic_publish("", name, str(i).encode())
    pump(conn, lambda: len(a) + len(b) >= 5)
    assert a == [str(i).encode() for i in range(5)] and b == []


def test_consumer_priority(conn, ch, name):
    ch.queue_declare(name)
    low, high = [], []
    ch.basic_consume(name, lambda c, m, p, body: low.append(body), auto_ack=True, arguments={"x-priority": 1})
    ch.basic_consume(name, lambda c, m, p, body: high.append(body), auto_ack=True, arguments={"x-priority": 5})
    for i in range(5):
        ch.basic_publish("", name, str(i).encode())
    pump(conn, lambda: len(high) + len(low) >= 5)
    assert len(high) == 5 and low == []


def test_consumer_priority_falls_back_when_high_is_full(conn, ch, name):
    ch.queue_declare(name)
    ch.basic_qos(prefetch_count=2)
    low, high = [], []
    ch.basic_consume(name, lambda c, m, p, body: low.append(body), arguments={"x-priority": 1})
    ch.basic_consume(name, lambda c, m, p, body: high.append(body), arguments={"x-priority": 5})
    for i in range(5):
        ch.basic_publish("", name, str(i).encode())
    pump(conn, lambda: len(high) + len(low) >= 4)
    assert high == [b"0", b"1"] and low == [b"2", b"3"]


def test_direct_reply_to_rpc(broker, conn, ch, name):
    ch.queue_declare(name)
    server = pika.BlockingConnection(pika.URLParameters(broker.url))
    sch = server.channel()
    replies = []
    ch.basic_consume("amq.rabbitmq.reply-to", lambda c, m, p, b: replies.append((b, p.correlation_id)), auto_ack=True)
    ch.basic_publish("", name, b"ping", pika.BasicProperties(reply_to="amq.rabbitmq.reply-to", correlation_id="42"))
    m, props, body = get(sch, name)
    assert body == b"ping"
    assert props.reply_to.startswith("amq.rabbitmq.reply-to.") and len(props.reply_to) > len("amq.rabbitmq.reply-to.")
    sch.basic_publish("", props.reply_to, b"pong", pika.BasicProperties(correlation_id=props.correlation_id))
    pump(conn, lambda: replies)
    server.close()
    assert replies == [(b"pong", "42")]


def test_direct_reply_to_consumer_again_after_cancel(broker, conn, ch, name):
    """FastStream's request(): consume on amq.rabbitmq.reply-to, one RPC, cancel, again."""
    ch.queue_declare(name)
    server = pika.BlockingConnection(pika.URLParameters(broker.url))
    sch = server.channel()
    addresses = []
    for i in range(3):
        replies = []
        tag = ch.basic_consume("amq.rabbitmq.reply-to", lambda c, m, p, b: replies.append(b), auto_ack=True)
        ch.basic_publish("", name, b"ping", pika.BasicProperties(reply_to="amq.rabbitmq.reply-to"))
        props = get(sch, name)[1]
        addresses.append(props.reply_to)
        sch.basic_publish("", props.reply_to, b"pong%d" % i)
        pump(conn, lambda: replies)
        assert replies == [b"pong%d" % i]
        ch.basic_cancel(tag)
    server.close()
    assert len(set(addresses)) == 3, "each reply consumer gets a new address"
    # No reply consumer now: publishing with the pseudo-queue as reply_to is refused.
    with pytest.raises(ChannelClosedByBroker) as e:
        ch.basic_publish("", name, b"ping", pika.BasicProperties(reply_to="amq.rabbitmq.reply-to"))
        ch.queue_declare(name, passive=True)
    assert (e.value.reply_code, e.value.reply_text) == (406, "PRECONDITION_FAILED - fast reply consumer does not exist")


def test_empty_queue_name_is_the_last_declared_queue(conn, name):
    """AMQP 0-9-1: an empty queue name means the channel's last declared queue."""
    for method in ("consume", "get", "purge", "delete", "bind", "unbind"):
        ch = conn.channel()
        with pytest.raises(ChannelClosedByBroker) as e:
            {
                "consume": lambda: ch.basic_consume("", lambda *a: None),
                "get": lambda: ch.basic_get(""),
                "purge": lambda: ch.queue_purge(""),
                "delete": lambda: ch.queue_delete(""),
                "bind": lambda: ch.queue_bind("", "amq.direct", "k"),
                "unbind": lambda: ch.queue_unbind("", "amq.direct", "k"),
            }[method]()
        assert (e.value.reply_code, e.value.reply_text) == (404, "NOT_FOUND - no previously declared queue"), method
    ch = conn.channel()
    q = ch.queue_declare("", exclusive=True).method.queue
    # bind with an empty queue and routing key: the queue under its own name.
    ch.queue_bind("", "amq.direct", "")
    ch.basic_publish("amq.direct", q, b"a")
    assert get(ch, "")[2] == b"a"
    ch.basic_publish("", q, b"b")
    wait_ready(ch, q, 1)
    assert ch.queue_purge("").method.message_count == 1
    got = []
    ch.basic_consume("", lambda c, m, p, b: got.append(b), auto_ack=True)
    ch.basic_publish("", q, b"c")
    pump(conn, lambda: got)
    assert got == [b"c"]
    # A passive declare counts too; another channel has its own.
    ch2 = conn.channel()
    ch2.queue_declare(q, passive=True)
    assert ch2.queue_purge("").method.message_count == 0
    with pytest.raises(ChannelClosedByBroker) as e:
        conn.channel().basic_get("")
    assert e.value.reply_code == 404
    ch3 = conn.channel()
    ch3.queue_declare(name)
    ch3.basic_publish("", name, b"e")
    wait_ready(ch3, name, 1)
    assert ch3.queue_delete("").method.message_count == 1
    # The name stays after the queue is gone: 404 for that queue.
    with pytest.raises(ChannelClosedByBroker) as e:
        ch3.basic_get("")
    assert (e.value.reply_code, e.value.reply_text) == (404, f"NOT_FOUND - no queue '{name}' in vhost '/'")


def test_server_named_queue(ch):
    ok = ch.queue_declare("", exclusive=True).method
    assert ok.queue.startswith("amq.gen-") and len(ok.queue) > len("amq.gen-")
    assert ok.message_count == 0 and ok.consumer_count == 0
    other = ch.queue_declare("", exclusive=True).method.queue
    assert other != ok.queue
    ch.basic_publish("", ok.queue, b"x")
    assert get(ch, ok.queue)[2] == b"x"


def test_purge_and_delete_conditions(conn, ch, name):
    ch.queue_declare(name)
    for _ in range(3):
        ch.basic_publish("", name, b"x")
    wait_ready(ch, name, 3)
    assert ch.queue_purge(name).method.message_count == 3
    assert ch.queue_purge(name).method.message_count == 0
    ch.basic_publish("", name, b"x")
    wait_ready(ch, name, 1)
    with pytest.raises(ChannelClosedByBroker) as e:
        ch.queue_delete(name, if_empty=True)
    assert e.value.reply_code == 406
    assert e.value.reply_text == f"PRECONDITION_FAILED - queue '{name}' in vhost '/' not empty"
    ch = conn.channel()
    ch.basic_consume(name, lambda *a: None)
    with pytest.raises(ChannelClosedByBroker) as e:
        conn.channel().queue_delete(name, if_unused=True)
    assert e.value.reply_code == 406
    assert e.value.reply_text == f"PRECONDITION_FAILED - queue '{name}' in vhost '/' in use"
    ch.close()
    assert conn.channel().queue_delete(name, if_unused=True).method.message_count == 1


def test_wrong_password_refused(broker):
    params = pika.URLParameters(broker.url.replace("guest:guest", "guest:wrong"))
    with pytest.raises(ProbableAuthenticationError) as e:
        pika.BlockingConnection(params)
    assert "(403) 'ACCESS_REFUSED - Login was refused using authentication mechanism PLAIN" in str(e.value)


def test_unknown_user_refused(broker):
    params = pika.URLParameters(broker.url.replace("guest:guest", "nobody:secret"))
    with pytest.raises(ProbableAuthenticationError) as e:
        pika.BlockingConnection(params)
    assert "(403) 'ACCESS_REFUSED" in str(e.value)


def test_heartbeat_negotiated(broker):
    params = pika.URLParameters(broker.url)
    params.heartbeat = 5
    c = pika.BlockingConnection(params)
    assert c._impl.params.heartbeat == 5
    c.close()
    c = pika.BlockingConnection(pika.URLParameters(broker.url))  # the client takes the server's
    assert c._impl.params.heartbeat == 60
    assert c._impl.params.frame_max == 131072
    assert c._impl.params.channel_max == 2047
    c.close()
