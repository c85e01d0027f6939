"""MQTT 5.0 options with paho-mqtt, plus raw-socket exactly-once checks.

Only MQTT is used, so the same file is the differential run against Mosquitto:
`MQTT5_PORT=1891 pytest test_paho5.py` (reference Mosquitto from
../shared/reference-brokers.sh). Each test states the behaviour both brokers must show.
"""
import os
import queue
import socket
import struct
import threading
import time
import uuid

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions


@pytest.fixture
def port(broker):
    if os.environ.get("MQTT5_PORT"):
        return int(os.environ["MQTT5_PORT"])
    if broker.external:
        pytest.skip("the reference RabbitMQ 3.10 has no MQTT 5; set MQTT5_PORT=1891 for Mosquitto")
    return broker.mqtt_port


@pytest.fixture
def topic():
    return "p5/" + uuid.uuid4().hex[:10]


class Client:
    """A paho 5.0 client whose messages land in a queue."""

    def __init__(self, port, client_id=None, clean_start=True, expiry=None, will=None,
                 username="guest", connect_props=None):
        self.id = client_id or "p5-" + uuid.uuid4().hex[:8]
        self.c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=self.id,
                             protocol=mqtt.MQTTv5)
        if username:
            self.c.username_pw_set(username, "guest")
        if will:
            self.c.will_set(**will)
        self.got = queue.Queue()
        self.connack = queue.Queue()
        self.subacks = queue.Queue()
        self.c.on_message = lambda cl, u, m: self.got.put(m)
        self.c.on_connect = lambda cl, u, flags, reason, props: self.connack.put((flags, reason, props))
        self.c.on_subscribe = lambda cl, u, mid, reasons, props: self.subacks.put(reasons)
        props = connect_props or Properties(PacketTypes.CONNECT)
        if expiry is not None:
            props.SessionExpiryInterval = expiry
        self.c.connect("127.0.0.1", port, 30, clean_start=clean_start, properties=props)
        self.c.loop_start()
        self.flags, self.reason, self.props = self.connack.get(timeout=5)

    def subscribe(self, topic, qos=1, props=None, **opts):
        self.c.subscribe(topic, options=SubscribeOptions(qos=qos, **opts), properties=props)
        return self.subacks.get(timeout=5)

    def publish(self, topic, payload, qos=1, retain=False, props=None):
        self.c.publish(topic, payload, qos=qos, retain=retain, properties=props).wait_for_publish(5)

    def messages(self, seconds):
        out = []
        end = time.time() + seconds
        while True:
            left = end - time.time()
            if left <= 0:
                return out
            try:
                out.append(self.got.get(timeout=left))
            except queue.Empty:
                return out

    def close(self):
        self.c.disconnect()
        self.c.loop_stop()
        # The broker handles connections concurrently: a reconnect with the same client id
        # sent right away may arrive before this DISCONNECT is processed, and would then
        # be a session takeover, not a resumption.
        time.sleep(0.2)

    def drop(self):
        """An abnormal end: the socket goes without DISCONNECT."""
        self.c.loop_stop()
        self.c.socket().close()


def test_session_expiry_keeps_messages_for_a_resumed_session(port, topic):
    cid = "p5-sess-" + uuid.uuid4().hex[:6]
    a = Client(port, cid, clean_start=True, expiry=60)
    a.subscribe(topic, qos=1)
    a.close()
    p = Client(port)
    p.publish(topic, b"while away", qos=1)
    p.close()
    b = Client(port, cid, clean_start=False, expiry=60)
    assert b.flags.session_present
    m = b.got.get(timeout=5)
    assert (m.topic, m.payload, m.qos) == (topic, b"while away", 1)
    b.close()
    # Expiry 0 at the final DISCONNECT ends it: the next connect finds no session.
    c = Client(port, cid, clean_start=False, expiry=0)
    c.close()
    d = Client(port, cid, clean_start=False, expiry=0)
    assert not d.flags.session_present
    d.close()


def test_no_local_and_retain_as_published(port, topic):
    c = Client(port)
    c.subscribe(topic + "/nl", noLocal=True)
    c.subscribe(topic + "/rap", retainAsPublished=True)
    c.subscribe(topic + "/plain")
    c.publish(topic + "/nl", b"own", qos=1)
    other = Client(port)
    other.publish(topic + "/nl", b"other", qos=1)
    other.publish(topic + "/rap", b"kept-flag", qos=1, retain=True)
    other.publish(topic + "/plain", b"flag-cleared", qos=1, retain=True)
    got = {m.topic: m for m in c.messages(1.5)}
    assert got[topic + "/nl"].payload == b"other", "no-local drops only our own"
    assert got[topic + "/rap"].retain, "retain-as-published keeps RETAIN"
    assert not got[topic + "/plain"].retain, "live messages lose RETAIN otherwise"
    for t in ("/rap", "/plain"):
        other.publish(topic + t, b"", qos=1, retain=True)
    c.close()
    other.close()


def test_retain_handling(port, topic):
    p = Client(port)
    p.publish(topic, b"retained", qos=1, retain=True)
    c = Client(port)
    c.subscribe(topic, retainHandling=SubscribeOptions.RETAIN_SEND_IF_NEW_SUB)
    assert [m.payload for m in c.messages(1.0)] == [b"retained"]
    # Re-subscribing an existing subscription with handling 1: nothing again.
    c.subscribe(topic, retainHandling=SubscribeOptions.RETAIN_SEND_IF_NEW_SUB)
    assert c.messages(0.8) == []
    d = Client(port)
    d.subscribe(topic, retainHandling=SubscribeOptions.RETAIN_DO_NOT_SEND)
    assert d.messages(0.8) == []
    # Handling 0: every subscribe sends it, with RETAIN set.
    d.subscribe(topic, retainHandling=SubscribeOptions.RETAIN_SEND_ON_SUBSCRIBE)
    m = d.got.get(timeout=3)
    assert m.payload == b"retained" and m.retain
    p.publish(topic, b"", qos=1, retain=True)
    for x in (p, c, d):
        x.close()


def test_subscription_identifiers_of_every_matching_subscription(port, topic):
    c = Client(port)
    for sid, f in ((7, topic + "/+"), (9, topic + "/#")):
        props = Properties(PacketTypes.SUBSCRIBE)
        props.SubscriptionIdentifier = sid
        c.subscribe(f, props=props)
    p = Client(port)
    p.publish(topic + "/x", b"both", qos=1)
    msgs = c.messages(1.0)
    # MQTT 5 §3.3.4: one copy carrying every matching identifier (MQTT-3.3.4-4; Warren,
    # as RabbitMQ's routing delivers to a queue once) or one copy per subscription with
    # its own identifier (MQTT-3.3.4-5; Mosquitto).
    ids = sorted(i for m in msgs for i in m.properties.SubscriptionIdentifier)
    assert ids == [7, 9]
    assert len(msgs) in (1, 2)
    if not os.environ.get("MQTT5_PORT"):
        assert len(msgs) == 1, "Warren sends one copy"
    c.close()
    p.close()


def test_client_topic_alias_and_properties_pass_through(port, topic):
    c = Client(port)
    c.subscribe(topic)
    p = Client(port)
    first = Properties(PacketTypes.PUBLISH)
    first.TopicAlias = 3
    first.ResponseTopic = topic + "/reply"
    first.CorrelationData = b"\x00\x01corr"
    first.ContentType = "text/plain"
    first.PayloadFormatIndicator = 1
    first.UserProperty = [("k", "v"), ("k", "w")]
    p.publish(topic, b"one", props=first)
    # Alias only (empty topic name): the broker resolves it.
    again = Properties(PacketTypes.PUBLISH)
    again.TopicAlias = 3
    p.c.publish("", b"two", qos=1, properties=again).wait_for_publish(5)
    msgs = c.messages(1.5)
    assert [(m.topic, m.payload) for m in msgs] == [(topic, b"one"), (topic, b"two")]
    mp = msgs[0].properties
    assert mp.ResponseTopic == topic + "/reply"
    assert mp.CorrelationData == b"\x00\x01corr"
    assert mp.ContentType == "text/plain"
    assert mp.PayloadFormatIndicator == 1
    assert mp.UserProperty == [("k", "v"), ("k", "w")], "order and duplicates kept"
    c.close()
    p.close()


def test_message_expiry_drops_stale_messages_for_offline_sessions(port, topic):
    cid = "p5-exp-" + uuid.uuid4().hex[:6]
    a = Client(port, cid, expiry=60)
    a.subscribe(topic)
    a.close()
    p = Client(port)
    short = Properties(PacketTypes.PUBLISH)
    short.MessageExpiryInterval = 1
    p.publish(topic, b"stale", props=short)
    long = Properties(PacketTypes.PUBLISH)
    long.MessageExpiryInterval = 60
    p.publish(topic, b"fresh", props=long)
    time.sleep(2.2)
    b = Client(port, cid, clean_start=False, expiry=0)
    msgs = b.messages(1.5)
    assert [m.payload for m in msgs] == [b"fresh"]
    left = msgs[0].properties.MessageExpiryInterval
    assert 50 <= left <= 58, f"the remaining interval is sent, got {left}"
    b.close()
    p.close()


def test_will_delay_interval(port, topic):
    w = Client(port)
    w.subscribe(topic)
    will_props = Properties(PacketTypes.WILLMESSAGE)
    will_props.WillDelayInterval = 2
    a = Client(port, expiry=30, will=dict(topic=topic, payload=b"gone", qos=1,
                                          properties=will_props))
    start = time.time()
    a.drop()
    m = w.got.get(timeout=6)
    waited = time.time() - start
    assert m.payload == b"gone"
    assert waited >= 1.5, f"the will waited for its delay ({waited:.2f} s)"
    w.close()


def test_will_not_sent_on_normal_disconnect_but_sent_with_0x04(port, topic):
    w = Client(port)
    w.subscribe(topic + "/#")
    a = Client(port, will=dict(topic=topic + "/a", payload=b"a", qos=1))
    a.close()
    b = Client(port, will=dict(topic=topic + "/b", payload=b"b", qos=1))
    b.c.disconnect(reasoncode=mqtt.ReasonCode(PacketTypes.DISCONNECT, identifier=0x04))
    b.c.loop_stop()
    msgs = w.messages(1.5)
    assert [m.topic for m in msgs] == [topic + "/b"]
    w.close()


def test_shared_subscription_splits_messages(port, topic):
    group = "$share/g" + uuid.uuid4().hex[:4] + "/" + topic
    members = [Client(port), Client(port)]
    for m in members:
        m.subscribe(group)
    p = Client(port)
    for i in range(20):
        p.publish(topic, str(i).encode(), qos=1)
    got = [sorted(int(x.payload) for x in m.messages(1.5)) for m in members]
    assert sorted(got[0] + got[1]) == list(range(20)), "each message to one member"
    assert got[0] and got[1], "both members get some"
    for m in members + [p]:
        m.close()


def test_assigned_client_identifier(port):
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="", protocol=mqtt.MQTTv5)
    c.username_pw_set("guest", "guest")
    got = queue.Queue()
    c.on_connect = lambda cl, u, flags, reason, props: got.put((reason, props))
    c.connect("127.0.0.1", port, 30, clean_start=True)
    c.loop_start()
    reason, props = got.get(timeout=5)
    assert reason == 0
    assert props.AssignedClientIdentifier
    c.disconnect()
    c.loop_stop()


# ---- raw sockets ------------------------------------------------------------------


def packet(first, body):
    n, rem = len(body), b""
    while True:
        b, n = n % 128, n // 128
        rem += bytes([b | (0x80 if n else 0)])
        if not n:
            return bytes([first]) + rem + body


def mqtt_str(s):
    b = s.encode() if isinstance(s, str) else s
    return struct.pack(">H", len(b)) + b


def read_packet(s):
    first = s.recv(1)
    if not first:
        return None, b""
    n, shift = 0, 0
    while True:
        b = s.recv(1)[0]
        n |= (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            break
    body = b""
    while len(body) < n:
        chunk = s.recv(n - len(body))
        if not chunk:
            break
        body += chunk
    return first[0], body


def raw_connect(port, props=b"", client_id=None, user="guest"):
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    flags = 0x02 | (0xC0 if user else 0)
    body = mqtt_str("MQTT") + bytes([5, flags]) + struct.pack(">H", 30)
    body += bytes([len(props)]) + props
    body += mqtt_str(client_id or "raw-" + uuid.uuid4().hex[:8])
    if user:
        body += mqtt_str(user) + mqtt_str("guest")
    s.sendall(packet(0x10, body))
    return s


def test_qos2_publish_sent_twice_with_one_packet_id_is_delivered_once(port, topic):
    sub = Client(port)
    sub.subscribe(topic, qos=2)
    s = raw_connect(port)
    t, body = read_packet(s)
    assert t == 0x20 and body[1] == 0
    publish = mqtt_str(topic) + struct.pack(">H", 42) + b"\x00" + b"exactly once"
    s.sendall(packet(0x34, publish))
    assert read_packet(s) == (0x50, b"\x00\x2a")
    # The same packet id again, DUP set, before PUBREL: acknowledged, not routed again.
    s.sendall(packet(0x3C, publish))
    t, body = read_packet(s)
    assert (t, body[:2]) == (0x50, b"\x00\x2a")
    s.sendall(packet(0x62, b"\x00\x2a"))
    t, body = read_packet(s)
    assert (t, body[:2]) == (0x70, b"\x00\x2a")
    msgs = sub.messages(1.5)
    assert [m.payload for m in msgs] == [b"exactly once"]
    assert msgs[0].qos == 2
    s.close()
    sub.close()


def test_enhanced_authentication_method_is_refused(port):
    props = b"\x15" + mqtt_str("SCRAM-SHA-1")
    s = raw_connect(port, props=props)
    t, body = read_packet(s)
    assert t == 0x20
    # MQTT-4.12.0-1: 0x8C Bad authentication method (Mosquitto too without a plugin).
    assert body[1] == 0x8C
    assert read_packet(s)[0] is None, "then the connection closes"
    s.close()


def test_binary_payload_with_every_byte_value(port, topic):
    c = Client(port)
    c.subscribe(topic, qos=1)
    payload = bytes(range(256))
    Client(port).publish(topic, payload, qos=1)
    assert c.got.get(timeout=5).payload == payload
    c.close()


def raw_session(port):
    """A raw 5.0 connection whose CONNACK accepted it."""
    s = raw_connect(port)
    t, body = read_packet(s)
    assert t == 0x20 and body[1] == 0
    return s


def test_publish_to_sys_topics_is_refused(port):
    s = raw_session(port)
    # Clients may not publish to $SYS (0x87, the reason code alone: 3 bytes)...
    s.sendall(packet(0x32, mqtt_str("$SYS/broker/uptime") + b"\x00\x01\x00" + b"x"))
    assert read_packet(s) == (0x40, b"\x00\x01\x87")
    # ...but to a bridge's connection state topic (no subscriber: 0x10).
    state = "$SYS/broker/connection/" + uuid.uuid4().hex[:6] + "/state"
    s.sendall(packet(0x32, mqtt_str(state) + b"\x00\x02\x00" + b"1"))
    assert read_packet(s) == (0x40, b"\x00\x02\x10")
    s.close()


def test_server_disconnect_is_the_bare_reason_code(port):
    s = raw_session(port)
    # A topic alias that was never set: protocol error, DISCONNECT e0 01 82.
    s.sendall(packet(0x30, mqtt_str("") + b"\x03\x23\x00\x05" + b"x"))
    assert read_packet(s) == (0xE0, b"\x82")
    s.close()


def test_retained_messages_come_parents_first(port, topic):
    c = Client(port)
    for t in [f"{topic}/a/b/c", f"{topic}/a", f"{topic}/a/b"]:
        c.publish(t, b"r", retain=True)
    sub = Client(port)
    sub.subscribe(f"{topic}/#")
    got = [m.topic for m in sub.messages(1)]
    assert got == [f"{topic}/a", f"{topic}/a/b", f"{topic}/a/b/c"]
    for t in got:
        c.publish(t, b"", retain=True)
    c.close()
    sub.close()


@pytest.mark.parametrize("password", [None, ""])
def test_empty_user_name_without_password_is_anonymous(port, password):
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    flags = 0x82 if password is None else 0xC2
    body = mqtt_str("MQTT") + bytes([5, flags]) + struct.pack(">H", 30) + b"\x00"
    body += mqtt_str("raw-" + uuid.uuid4().hex[:8]) + mqtt_str("")
    if password is not None:
        body += mqtt_str(password)
    s.sendall(packet(0x10, body))
    t, body = read_packet(s)
    assert (t, body[1]) == (0x20, 0)
    s.close()
