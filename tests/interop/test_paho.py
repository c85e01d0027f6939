"""MQTT with paho-mqtt, and MQTT ↔ AMQP through amq.topic (run against RabbitMQ with
AMQP_URL=... MQTT_PORT=1890)."""
import threading
import time
import uuid

import paho.mqtt.client as mqtt
import pika


def client(broker, version=mqtt.MQTTv311, **kw):
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="p-" + uuid.uuid4().hex[:8], protocol=version, **kw)
    c.username_pw_set("guest", "guest")
    return c


def wait(cond, seconds=5.0):
    end = time.time() + seconds
    while not cond() and time.time() < end:
        time.sleep(0.02)
    return cond()


def test_paho_publish_subscribe_qos1(broker, name):
    got = []
    sub = client(broker)
    subscribed = threading.Event()
    sub.on_message = lambda c, u, m: got.append((m.topic, m.payload, m.qos))
    sub.on_subscribe = lambda *a: subscribed.set()
    sub.connect("127.0.0.1", broker.mqtt_port)
    sub.loop_start()
    sub.subscribe(f"{name}/+/temp", qos=1)
    assert subscribed.wait(5)
    pub = client(broker)
    pub.connect("127.0.0.1", broker.mqtt_port)
    pub.loop_start()
    pub.publish(f"{name}/kitchen/temp", b"21.5", qos=1).wait_for_publish(5)
    assert wait(lambda: got)
    assert got == [(f"{name}/kitchen/temp", b"21.5", 1)]
    for c in (sub, pub):
        c.loop_stop()
        c.disconnect()


def test_paho_mqtt5_connects(broker):
    if broker.external:
        import pytest
        pytest.skip("the reference RabbitMQ 3.10 has no MQTT 5")
    c = client(broker, version=mqtt.MQTTv5)
    rc = []
    c.on_connect = lambda cl, u, f, reason, props: rc.append(reason.value)
    c.connect("127.0.0.1", broker.mqtt_port)
    c.loop_start()
    assert wait(lambda: rc)
    assert rc == [0]
    c.loop_stop()
    c.disconnect()


def test_mqtt_publish_reaches_amqp_queue(broker, ch, name):
    ch.queue_declare(name)
    ch.queue_bind(name, "amq.topic", f"{name}.*.gps")
    pub = client(broker)
    pub.connect("127.0.0.1", broker.mqtt_port)
    pub.loop_start()
    pub.publish(f"{name}/42/gps", b"52.1,4.3", qos=1).wait_for_publish(5)
    pub.loop_stop()
    pub.disconnect()
    body = None
    for _ in range(50):
        m, props, body = ch.basic_get(name, auto_ack=True)
        if m:
            assert m.routing_key == f"{name}.42.gps"
            break
        time.sleep(0.05)
    assert body == b"52.1,4.3"


def test_amqp_publish_reaches_mqtt_subscriber(broker, ch, name):
    got = []
    subscribed = threading.Event()
    sub = client(broker)
    sub.on_message = lambda c, u, m: got.append((m.topic, m.payload))
    sub.on_subscribe = lambda *a: subscribed.set()
    sub.connect("127.0.0.1", broker.mqtt_port)
    sub.loop_start()
    sub.subscribe(f"{name}/#", qos=1)
    assert subscribed.wait(5)
    ch.basic_publish("amq.topic", f"{name}.fire.north", b"evacuate", pika.BasicProperties(delivery_mode=2))
    assert wait(lambda: got)
    assert got == [(f"{name}/fire/north", b"evacuate")]
    sub.loop_stop()
    sub.disconnect()


def test_mqtt5_properties_cross_to_amqp_and_back(broker, ch, name):
    if broker.external:
        import pytest
        pytest.skip("the reference RabbitMQ 3.10 has no MQTT 5")
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    ch.queue_declare(name)
    ch.queue_bind(name, "amq.topic", f"{name}.in")
    c = client(broker, version=mqtt.MQTTv5)
    got = []
    subscribed = threading.Event()
    c.on_message = lambda cl, u, m: got.append(m)
    c.on_subscribe = lambda *a: subscribed.set()
    c.connect("127.0.0.1", broker.mqtt_port)
    c.loop_start()
    props = Properties(PacketTypes.PUBLISH)
    props.ContentType = "application/json"
    props.ResponseTopic = f"{name}/replies"
    props.CorrelationData = b"req-7"
    props.UserProperty = [("tenant", "acme")]
    c.publish(f"{name}/in", b"{}", qos=1, properties=props).wait_for_publish(5)
    m = None
    for _ in range(50):
        m, p, body = ch.basic_get(name, auto_ack=True)
        if m:
            break
        time.sleep(0.05)
    assert m is not None
    assert p.content_type == "application/json"
    assert p.reply_to == f"{name}.replies"
    assert p.correlation_id == "req-7"
    assert p.headers["tenant"] == "acme"

    c.subscribe(f"{name}/out", qos=1)
    assert subscribed.wait(5)
    ch.basic_publish("amq.topic", f"{name}.out", b"hi", pika.BasicProperties(
        content_type="text/plain", correlation_id="c-1", headers={"region": "eu"}, delivery_mode=2))
    assert wait(lambda: got)
    mp = got[0].properties
    assert mp.ContentType == "text/plain"
    assert mp.CorrelationData == b"c-1"
    assert ("region", "eu") in mp.UserProperty
    c.loop_stop()
    c.disconnect()


def test_paho_over_websockets(broker):
    """paho-mqtt's WebSocket transport against Web-MQTT (`/ws`, subprotocol mqtt)."""
    import queue as _q
    got = _q.Queue()
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="paho-ws-" + uuid.uuid4().hex[:6],
                    transport="websockets")
    c.ws_set_options(path="/ws")
    c.on_message = lambda cl, ud, m: got.put((m.topic, m.payload))
    c.connect("127.0.0.1", broker.web_mqtt_port, 30)
    c.loop_start()
    try:
        topic = "ws/" + uuid.uuid4().hex[:6]
        r, _ = c.subscribe(topic, qos=1)
        time.sleep(0.3)
        c.publish(topic, b"over websockets", qos=1).wait_for_publish(5)
        assert got.get(timeout=5) == (topic, b"over websockets")
    finally:
        c.loop_stop()
        c.disconnect()
