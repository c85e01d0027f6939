"""stomp.py (TCP and WebSocket) against the broker: RabbitMQ's destinations, ack modes,
receipts, transactions, temp queues, and STOMP <-> AMQP properties."""
import queue
import time
import uuid

import pika
import pytest
import stomp


class Listener(stomp.ConnectionListener):
    def __init__(self):
        self.messages = queue.Queue()
        self.errors = queue.Queue()
        self.receipts = queue.Queue()

    def on_message(self, frame):
        self.messages.put(frame)

    def on_error(self, frame):
        self.errors.put(frame)

    def on_receipt(self, frame):
        self.receipts.put(frame.headers.get("receipt-id"))

    def get(self, timeout=5):
        return self.messages.get(timeout=timeout)

    def none(self, wait=0.3):
        try:
            f = self.messages.get(timeout=wait)
        except queue.Empty:
            return True
        raise AssertionError(f"unexpected message {f}")


def connect(broker, version="1.2", ws=False, **kw):
    port = broker.web_stomp_port if ws else broker.stomp_port
    cls = {"1.0": stomp.Connection10, "1.1": stomp.Connection11, "1.2": stomp.Connection12}[version]
    if ws:
        c = stomp.WSConnection([("127.0.0.1", port)], ws_path="/ws", vhost="/", **kw)
    elif version == "1.0":
        c = cls([("127.0.0.1", port)], **kw)
    else:
        c = cls([("127.0.0.1", port)], vhost="/", **kw)
    l = Listener()
    c.set_listener("l", l)
    c.connect("guest", "guest", wait=True)
    return c, l


@pytest.fixture
def qname():
    return "stomp-" + uuid.uuid4().hex[:8]


@pytest.mark.parametrize("version", ["1.0", "1.1", "1.2"])
def test_queue_round_trip_each_version(broker, qname, version):
    c, l = connect(broker, version)
    kw = {"id": "s1"} if version != "1.0" else {}
    c.subscribe(f"/queue/{qname}", ack="client-individual" if version != "1.0" else "client", **kw)
    c.send(f"/queue/{qname}", "hello", headers={"x-note": "n1"})
    m = l.get()
    assert m.body == "hello"
    assert m.headers["destination"] == f"/queue/{qname}"
    assert m.headers["x-note"] == "n1"
    if version == "1.2":
        c.ack(m.headers["ack"])
    elif version == "1.1":
        c.ack(m.headers["message-id"], "s1")
    else:
        c.ack(m.headers["message-id"])
    c.disconnect()


def test_nack_requeues_and_disconnect_requeues(broker, qname):
    c, l = connect(broker)
    c.subscribe(f"/queue/{qname}", id="s", ack="client-individual")
    c.send(f"/queue/{qname}", "again")
    m = l.get()
    c.nack(m.headers["ack"])
    m2 = l.get()
    assert m2.body == "again" and m2.headers["redelivered"] == "true"
    c.disconnect()
    c, l = connect(broker)
    c.subscribe(f"/queue/{qname}", id="s", ack="auto")
    assert l.get().headers["redelivered"] == "true"
    c.disconnect()


def test_receipt_and_transaction(broker, qname):
    c, l = connect(broker)
    c.subscribe(f"/queue/{qname}", id="s", ack="auto")
    tx = c.begin()
    c.send(f"/queue/{qname}", "in-tx", transaction=tx)
    l.none()
    c.commit(tx)
    assert l.get().body == "in-tx"
    tx = c.abort(c.begin()) if False else c.begin()
    c.send(f"/queue/{qname}", "aborted", transaction=tx)
    c.abort(tx)
    l.none()
    c.send(f"/queue/{qname}", "receipted", headers={"receipt": "r-1", "persistent": "true"})
    assert l.receipts.get(timeout=5) == "r-1"
    assert l.get().body == "receipted"
    c.disconnect()


def test_topic_and_exchange_destinations(broker):
    c, l = connect(broker)
    key = uuid.uuid4().hex[:6]
    c.subscribe(f"/topic/{key}.*", id="t", ack="auto")
    c.subscribe(f"/exchange/amq.direct/{key}", id="d", ack="auto")
    time.sleep(0.2)
    c.send(f"/topic/{key}.x", "topic")
    c.send(f"/exchange/amq.direct/{key}", "direct")
    got = sorted([l.get().body, l.get().body])
    assert got == ["direct", "topic"]
    c.disconnect()


def test_temp_queue_rpc(broker, qname):
    srv, sl = connect(broker)
    srv.subscribe(f"/queue/{qname}", id="srv", ack="auto")
    cli, cl = connect(broker)
    cli.send(f"/queue/{qname}", "ping", headers={"reply-to": "/temp-queue/rpc"})
    req = sl.get()
    assert req.headers["reply-to"].startswith("/reply-queue/")
    srv.send(req.headers["reply-to"], "pong")
    assert cl.get().body == "pong"
    srv.disconnect()
    cli.disconnect()


def test_stomp_to_amqp_and_back(broker, qname):
    c, l = connect(broker)
    c.send(f"/queue/{qname}", "to amqp", headers={
        "content-type": "text/plain", "persistent": "true", "correlation-id": "c9",
        "priority": "5", "x-origin": "stomp", "receipt": "r"})
    assert l.receipts.get(timeout=5) == "r"
    conn = pika.BlockingConnection(pika.URLParameters(broker.url))
    ch = conn.channel()
    method, props, body = ch.basic_get(qname, auto_ack=True)
    assert body == b"to amqp"
    assert props.content_type == "text/plain"
    assert props.delivery_mode == 2
    assert props.correlation_id == "c9"
    assert props.priority == 5
    assert props.headers["x-origin"] == "stomp"
    # AMQP -> STOMP through /amq/queue.
    c.subscribe(f"/amq/queue/{qname}", id="a", ack="auto")
    ch.basic_publish("", qname, b"to stomp", pika.BasicProperties(
        content_type="application/json", message_id="m1", headers={"k": "v"}))
    m = l.get()
    assert m.body == "to stomp"
    assert m.headers["content-type"] == "application/json"
    assert m.headers["amqp-message-id"] == "m1"
    assert m.headers["k"] == "v"
    conn.close()
    c.disconnect()


@pytest.mark.parametrize("offset,expected", [
    ("first", ["0", "1", "2"]),
    ("offset=1", ["1", "2"]),
    ("timestamp=1000", ["0", "1", "2"]),
    ("next", []),
])
def test_stream_subscription_from_an_offset(broker, qname, offset, expected):
    conn = pika.BlockingConnection(pika.URLParameters(broker.url))
    ch = conn.channel()
    ch.queue_declare(qname, durable=True, arguments={"x-queue-type": "stream"})
    ch.confirm_delivery()
    for i in range(3):
        ch.basic_publish("", qname, str(i).encode())
    c, l = connect(broker)
    c.subscribe(f"/amq/queue/{qname}", id="s", ack="client",
                headers={"prefetch-count": "10", "x-stream-offset": offset})
    got = []
    for _ in expected:
        m = l.get()
        got.append(m.headers["x-stream-offset"])
        c.ack(m.headers["ack"])
    assert got == expected
    assert l.none()
    c.disconnect()
    ch.queue_delete(qname)
    conn.close()


def test_stream_subscription_needs_prefetch(broker, qname):
    conn = pika.BlockingConnection(pika.URLParameters(broker.url))
    conn.channel().queue_declare(qname, durable=True, arguments={"x-queue-type": "stream"})
    c, l = connect(broker)
    c.subscribe(f"/amq/queue/{qname}", id="s", ack="client")
    e = l.errors.get(timeout=5)
    assert e.headers["message"] == "precondition_failed"
    assert "consumer prefetch count is not set" in e.body
    conn.channel().queue_delete(qname)
    conn.close()


def test_declare_exchange_header(broker, qname):
    """RabbitMQ 3.13's `declare-exchange` (3.10 has not got it): the exchange of an
    /exchange destination is declared with the given type and flags."""
    if broker.external:
        pytest.skip("RabbitMQ 3.10 does not declare exchanges for STOMP")
    x = "x-" + qname
    c, l = connect(broker)
    c.subscribe(f"/exchange/{x}/k.*", id="d", ack="auto", headers={
        "declare-exchange": "true", "exchange-type": "topic",
        "exchange-durable": "false", "exchange-auto-delete": "true", "receipt": "sub"})
    assert l.receipts.get(timeout=5) == "sub"
    c.send(f"/exchange/{x}/k.1", "via declared", headers={"declare-exchange": "true",
                                                          "exchange-type": "topic",
                                                          "exchange-durable": "false",
                                                          "exchange-auto-delete": "true"})
    assert l.get().body == "via declared"
    conn = pika.BlockingConnection(pika.URLParameters(broker.url))
    # Equivalent: the same properties redeclare fine over AMQP.
    conn.channel().exchange_declare(x, "topic", durable=False, auto_delete=True)
    conn.close()
    # An inequivalent declaration is the exchange.declare 406.
    c.send(f"/exchange/{x}/k.2", "x", headers={"declare-exchange": "true"})
    e = l.errors.get(timeout=5)
    assert e.headers["message"] == "precondition_failed"
    c.disconnect()


def test_error_on_missing_queue(broker):
    c, l = connect(broker)
    c.subscribe("/amq/queue/does-not-exist-" + uuid.uuid4().hex[:6], id="x", ack="auto")
    e = l.errors.get(timeout=5)
    assert e.headers["message"] == "not_found"
    assert "NOT_FOUND" in e.body


def test_web_stomp_with_stomp_py(broker, qname):
    c, l = connect(broker, ws=True)
    c.subscribe(f"/queue/{qname}", id="w", ack="client-individual")
    c.send(f"/queue/{qname}", "over websocket")
    m = l.get()
    assert m.body == "over websocket"
    c.ack(m.headers["ack"])
    # A TCP publisher reaches the WebSocket subscriber.
    t, _ = connect(broker)
    t.send(f"/queue/{qname}", "from tcp")
    assert l.get().body == "from tcp"
    t.disconnect()
    c.disconnect()
