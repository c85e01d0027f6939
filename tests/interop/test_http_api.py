"""The management HTTP API with `requests`, as RabbitMQ's docs describe it, plus a
permission denial seen by pika (403 ACCESS_REFUSED).

Every test also passes against RabbitMQ:
  AMQP_URL=amqp://guest:guest@127.0.0.1:5680/ HTTP_API_URL=http://127.0.0.1:15680 pytest test_http_api.py
"""
import contextlib
import urllib.parse

import pika
import pytest
import requests
from pika.exceptions import ChannelClosedByBroker

AUTH = ("guest", "guest")


def q(s):
    return urllib.parse.quote(s, safe="")


def test_overview_and_auth(api_url):
    r = requests.get(f"{api_url}/api/overview")
    assert r.status_code == 401
    assert r.headers["WWW-Authenticate"].startswith("Basic")
    o = requests.get(f"{api_url}/api/overview", auth=AUTH).json()
    for k in ("management_version", "rabbitmq_version", "node", "object_totals", "queue_totals", "listeners"):
        assert k in o
    assert requests.get(f"{api_url}/api/whoami", auth=AUTH).json()["name"] == "guest"
    # Read by the UI before it logs in: no credentials needed, no OAuth here.
    assert requests.get(f"{api_url}/api/auth").json()["enable_uaa"] is False
    r = requests.get(f"{api_url}/api/queues/%2F/no-such-queue-here", auth=AUTH)
    assert r.status_code == 404
    assert r.json() == {"error": "Object Not Found", "reason": "Not Found"}


def test_queue_lifecycle_publish_get(api_url, name):
    base = f"{api_url}/api/queues/%2F/{q(name)}"
    assert requests.put(base, json={"durable": True, "auto_delete": False, "arguments": {}}, auth=AUTH).status_code == 201
    assert requests.put(base, json={"durable": True, "auto_delete": False, "arguments": {}}, auth=AUTH).status_code == 204
    r = requests.post(f"{api_url}/api/exchanges/%2F/amq.default/publish", auth=AUTH,
                      json={"properties": {"delivery_mode": 2}, "routing_key": name, "payload": "hello", "payload_encoding": "string"})
    assert r.json() == {"routed": True}
    got = requests.post(f"{base}/get", auth=AUTH, json={"count": 1, "ackmode": "ack_requeue_true", "encoding": "auto"}).json()
    assert got[0]["payload"] == "hello"
    assert got[0]["routing_key"] == name
    assert got[0]["properties"]["delivery_mode"] == 2
    import time
    keys = ("name", "vhost", "durable", "auto_delete", "exclusive", "arguments", "messages", "messages_ready",
            "messages_unacknowledged", "consumers", "state", "node")
    deadline = time.time() + 15
    info = requests.get(base, auth=AUTH).json()
    while not all(k in info for k in keys) and time.time() < deadline:  # RabbitMQ fills stats later
        time.sleep(0.5)
        info = requests.get(base, auth=AUTH).json()
    for k in keys:
        assert k in info, k
    assert info["messages"] in (0, 1)  # RabbitMQ's counts lag by its stats interval
    assert requests.delete(f"{base}/contents", auth=AUTH).status_code == 204
    assert requests.delete(base, auth=AUTH).status_code == 204
    assert requests.get(base, auth=AUTH).status_code == 404


def test_exchange_and_binding(api_url, name):
    x = f"{api_url}/api/exchanges/%2F/{q(name)}-x"
    assert requests.put(x, json={"type": "topic", "durable": False}, auth=AUTH).status_code == 201
    requests.put(f"{api_url}/api/queues/%2F/{q(name)}", json={"durable": False}, auth=AUTH)
    r = requests.post(f"{api_url}/api/bindings/%2F/e/{q(name)}-x/q/{q(name)}", json={"routing_key": "a.*", "arguments": {}}, auth=AUTH)
    assert r.status_code == 201
    assert "Location" in r.headers
    bs = requests.get(f"{api_url}/api/bindings/%2F/e/{q(name)}-x/q/{q(name)}", auth=AUTH).json()
    assert [b["routing_key"] for b in bs] == ["a.*"]
    props = bs[0]["properties_key"]
    r = requests.post(f"{x}/publish", auth=AUTH, json={"properties": {}, "routing_key": "a.b", "payload": "x", "payload_encoding": "string"})
    assert r.json() == {"routed": True}
    assert requests.delete(f"{api_url}/api/bindings/%2F/e/{q(name)}-x/q/{q(name)}/{q(props)}", auth=AUTH).status_code == 204
    r = requests.post(f"{x}/publish", auth=AUTH, json={"properties": {}, "routing_key": "a.b", "payload": "x", "payload_encoding": "string"})
    assert r.json() == {"routed": False}
    assert requests.delete(x, auth=AUTH).status_code == 204
    # Publishing to a missing exchange: the channel's 404 inside a 400, as RabbitMQ.
    r = requests.post(f"{x}/publish", auth=AUTH, json={"properties": {}, "routing_key": "a.b", "payload": "x", "payload_encoding": "string"})
    assert r.status_code == 400
    assert r.json()["reason"] == f"404 NOT_FOUND - no exchange '{name}-x' in vhost '/'"
    requests.delete(f"{api_url}/api/queues/%2F/{q(name)}", auth=AUTH)


def test_pagination(api_url, name):
    for i in range(12):
        requests.put(f"{api_url}/api/queues/%2F/{q(name)}-{i:02}", json={"durable": False}, auth=AUTH)
    r = requests.get(f"{api_url}/api/queues/%2F", auth=AUTH,
                     params={"page": 2, "page_size": 5, "name": f"^{name}-", "use_regex": "true"}).json()
    assert r["filtered_count"] == 12
    assert r["page"] == 2 and r["page_size"] == 5 and r["page_count"] == 3
    assert r["item_count"] == 5
    assert [i["name"] for i in r["items"]] == [f"{name}-{i:02}" for i in range(5, 10)]
    for i in range(12):
        requests.delete(f"{api_url}/api/queues/%2F/{q(name)}-{i:02}", auth=AUTH)


def test_permission_denied_seen_by_pika(api_url, broker, name):
    user = f"{name}-u"
    assert requests.put(f"{api_url}/api/users/{user}", json={"password": "pw", "tags": ""}, auth=AUTH).status_code == 201
    r = requests.put(f"{api_url}/api/permissions/%2F/{user}", auth=AUTH,
                     json={"configure": "^allowed-", "write": "^allowed-", "read": "^allowed-"})
    assert r.status_code == 201
    params = pika.URLParameters(broker.url)
    params.credentials = pika.PlainCredentials(user, "pw")
    conn = pika.BlockingConnection(params)
    try:
        ch = conn.channel()
        ch.queue_declare(f"allowed-{name}", auto_delete=True)
        with pytest.raises(ChannelClosedByBroker) as e:
            ch.queue_declare(f"denied-{name}")
        assert e.value.reply_code == 403
        assert e.value.reply_text == (
            f"ACCESS_REFUSED - access to queue 'denied-{name}' in vhost '/' refused for user '{user}'")
    finally:
        conn.close()
        requests.delete(f"{api_url}/api/users/{user}", auth=AUTH)


def test_topic_permission_denied_seen_by_pika(api_url, broker, name):
    """RabbitMQ's topic authorisation: set through the API, enforced on a publish."""
    user = f"{name}-t"
    assert requests.put(f"{api_url}/api/users/{user}", json={"password": "pw", "tags": ""}, auth=AUTH).status_code == 201
    try:
        assert requests.put(f"{api_url}/api/permissions/%2F/{user}", auth=AUTH,
                            json={"configure": ".*", "write": ".*", "read": ".*"}).status_code == 201
        r = requests.put(f"{api_url}/api/topic-permissions/%2F/{user}", auth=AUTH,
                         json={"exchange": "amq.topic", "write": "^{username}\\.", "read": ".*"})
        assert r.status_code == 201
        listed = requests.get(f"{api_url}/api/topic-permissions/%2F/{user}", auth=AUTH).json()
        assert listed == [{"user": user, "vhost": "/", "exchange": "amq.topic",
                           "write": "^{username}\\.", "read": ".*"}]
        assert any(p["user"] == user for p in requests.get(f"{api_url}/api/topic-permissions", auth=AUTH).json())
        params = pika.URLParameters(broker.url)
        params.credentials = pika.PlainCredentials(user, "pw")
        conn = pika.BlockingConnection(params)
        try:
            ch = conn.channel()
            ch.confirm_delivery()
            ch.basic_publish("amq.topic", f"{user}.ok", b"allowed")
            with pytest.raises(ChannelClosedByBroker) as e:
                ch.basic_publish("amq.topic", "other.key", b"denied")
            assert e.value.reply_code == 403
            assert e.value.reply_text == (
                "ACCESS_REFUSED - write access to topic 'other.key' in exchange 'amq.topic' "
                f"in vhost '/' refused for user '{user}'")
        finally:
            conn.close()
        assert requests.delete(f"{api_url}/api/topic-permissions/%2F/{user}", auth=AUTH).status_code == 204
        assert requests.get(f"{api_url}/api/topic-permissions/%2F/{user}", auth=AUTH).status_code == 404
    finally:
        requests.delete(f"{api_url}/api/users/{user}", auth=AUTH)


def test_close_connection(api_url, broker, name):
    params = pika.URLParameters(broker.url)
    params.client_properties = {"connection_name": name}
    conn = pika.BlockingConnection(params)
    import time
    deadline = time.time() + 10
    mine = []
    while time.time() < deadline and not mine:
        conns = requests.get(f"{api_url}/api/connections", auth=AUTH).json()
        mine = [c for c in conns if c.get("client_properties", {}).get("connection_name") == name]
        time.sleep(0.2)
    assert mine, "connection listed"
    r = requests.delete(f"{api_url}/api/connections/{q(mine[0]['name'])}", auth=AUTH, headers={"X-Reason": "test"})
    assert r.status_code == 204
    with pytest.raises(pika.exceptions.ConnectionClosedByBroker) as e:
        for _ in range(100):
            conn.process_data_events(time_limit=0.1)
    assert e.value.reply_code == 320


def test_definitions_export_import(api_url, broker, name):
    r = requests.get(f"{api_url}/api/definitions", auth=AUTH)
    if r.status_code == 500 and broker.external:
        pytest.skip("the reference broker fails to export its definitions (500)")
    defs = r.json()
    for k in ("users", "vhosts", "permissions", "queues", "exchanges", "bindings"):
        assert k in defs
    assert any(u["name"] == "guest" and u["password_hash"] for u in defs["users"])
    new = {"queues": [{"name": f"{name}-def", "vhost": "/", "durable": True, "auto_delete": False, "arguments": {}}]}
    r = requests.post(f"{api_url}/api/definitions", json=new, auth=AUTH)
    assert r.status_code in (200, 201, 204)
    assert requests.get(f"{api_url}/api/queues/%2F/{q(name)}-def", auth=AUTH).status_code == 200
    requests.delete(f"{api_url}/api/queues/%2F/{q(name)}-def", auth=AUTH)


def test_health_and_aliveness(api_url):
    assert requests.get(f"{api_url}/api/health/checks/alarms", auth=AUTH).json()["status"] == "ok"
    assert requests.get(f"{api_url}/api/aliveness-test/%2F", auth=AUTH).json() == {"status": "ok"}


def _limited_user(api_url, user):
    """A user that may use only resources named `allowed-*` in vhost `/`."""
    assert requests.put(f"{api_url}/api/users/{user}", json={"password": "pw", "tags": ""},
                        auth=AUTH).status_code == 201
    r = requests.put(f"{api_url}/api/permissions/%2F/{user}", auth=AUTH,
                     json={"configure": "^allowed-", "write": "^allowed-", "read": "^allowed-"})
    assert r.status_code == 201


def test_permission_denied_seen_by_paho_mqtt5(api_url, broker, name):
    """No read/write on amq.topic: SUBACK and PUBACK carry 0x87 Not authorized."""
    import queue as _q
    import paho.mqtt.client as mqtt
    if broker.external:
        pytest.skip("the reference RabbitMQ 3.10 has no MQTT 5")
    user = f"{name}-m"
    _limited_user(api_url, user)
    try:
        c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=user, protocol=mqtt.MQTTv5)
        c.username_pw_set(user, "pw")
        subacks, pubacks, connacks = _q.Queue(), _q.Queue(), _q.Queue()
        c.on_connect = lambda cl, u, f, reason, p: connacks.put(reason.value)
        c.on_subscribe = lambda cl, u, mid, reasons, p: subacks.put([r.value for r in reasons])
        c.on_publish = lambda cl, u, mid, reason, p: pubacks.put(reason.value)
        c.connect("127.0.0.1", broker.mqtt_port)
        c.loop_start()
        try:
            assert connacks.get(timeout=5) == 0
            c.subscribe(f"{name}/t", qos=1)
            assert subacks.get(timeout=5) == [0x87]
            c.publish(f"{name}/t", b"x", qos=1)
            assert pubacks.get(timeout=5) == 0x87
        finally:
            c.disconnect()
            c.loop_stop()
    finally:
        requests.delete(f"{api_url}/api/users/{user}", auth=AUTH)


def test_permission_denied_seen_by_stomp_py(api_url, broker, name):
    """No write on amq.topic: a SEND to /topic/... gets an ERROR frame."""
    import queue as _q
    import stomp
    user = f"{name}-s"
    _limited_user(api_url, user)
    errors = _q.Queue()

    class L(stomp.ConnectionListener):
        def on_error(self, frame):
            errors.put(frame)

    try:
        conn = stomp.Connection12([("127.0.0.1", broker.stomp_port)], vhost="/")
        conn.set_listener("l", L())
        conn.connect(user, "pw", wait=True)
        conn.send(f"/topic/{name}.x", "denied")
        frame = errors.get(timeout=5)
        assert "access_refused" in frame.headers.get("message", "").lower() + frame.body.lower() \
            or "refused" in frame.headers.get("message", "").lower()
        try:
            conn.disconnect()
        except Exception:
            pass
    finally:
        requests.delete(f"{api_url}/api/users/{user}", auth=AUTH)


def test_policy_lifecycle_and_effect(api_url, broker, name):
    """A max-length + DLX policy set over the API trims an existing queue, shows on it,
    validates as RabbitMQ does, and goes away when deleted."""
    vq = f"{api_url}/api/queues/%2F/{q(name)}"
    pol = f"{api_url}/api/policies/%2F/{q(name)}-pol"
    conn = pika.BlockingConnection(pika.URLParameters(broker.url))
    try:
        ch = conn.channel()
        ch.queue_declare(name)
        for i in range(5):
            ch.basic_publish("", name, str(i).encode())
        body = {"pattern": "^" + name + "$", "definition": {"max-length": 2}, "apply-to": "queues", "priority": 3}
        assert requests.put(pol, json=body, auth=AUTH).status_code == 201
        assert requests.put(pol, json=body, auth=AUTH).status_code == 204
        got = requests.get(pol, auth=AUTH).json()
        assert got == {"vhost": "/", "name": name + "-pol", "pattern": "^" + name + "$",
                       "apply-to": "queues", "definition": {"max-length": 2}, "priority": 3}
        assert any(p["name"] == name + "-pol" for p in requests.get(f"{api_url}/api/policies/%2F", auth=AUTH).json())
        import time
        deadline = time.time() + 15
        while requests.get(vq, auth=AUTH).json().get("policy") != name + "-pol" and time.time() < deadline:
            time.sleep(0.2)   # RabbitMQ applies policies asynchronously
        assert requests.get(vq, auth=AUTH).json()["policy"] == name + "-pol"
        assert ch.queue_declare(name, passive=True).method.message_count == 2
        m, _, b = ch.basic_get(name, auto_ack=True)
        assert b == b"3", "drop-head kept the newest"
        r = requests.put(f"{api_url}/api/policies/%2F/{q(name)}-bad", auth=AUTH,
                         json={"pattern": ".*", "definition": {"no-such-key": 1}})
        assert r.status_code == 400
        assert "not recognised policy settings" in r.json()["reason"]
        assert requests.delete(pol, auth=AUTH).status_code == 204
        assert requests.get(pol, auth=AUTH).status_code == 404
        deadline = time.time() + 15
        while requests.get(vq, auth=AUTH).json().get("policy") and time.time() < deadline:
            time.sleep(0.2)
        for i in range(5):
            ch.basic_publish("", name, b"x")
        count = lambda: ch.queue_declare(name, passive=True).method.message_count
        deadline = time.time() + 5
        while count() != 6 and time.time() < deadline:
            time.sleep(0.1)
        assert count() == 6, "no limit once the policy is gone"
        ch.queue_delete(name)
    finally:
        conn.close()


def test_vhost_limits_refuse_queues_and_connections(api_url, broker, name):
    """max-queues and max-connections on a fresh vhost: RabbitMQ's 406 and 530 texts."""
    vh = name + "-vh"
    base = f"{api_url}/api/vhosts/{q(vh)}"
    assert requests.put(base, auth=AUTH).status_code in (201, 204)
    try:
        requests.put(f"{api_url}/api/permissions/{q(vh)}/guest", auth=AUTH,
                     json={"configure": ".*", "write": ".*", "read": ".*"})
        lim = f"{api_url}/api/vhost-limits/{q(vh)}"
        assert requests.put(f"{lim}/max-queues", json={"value": 1}, auth=AUTH).status_code == 204
        assert requests.put(f"{lim}/max-connections", json={"value": 1}, auth=AUTH).status_code == 204
        got = requests.get(lim, auth=AUTH).json()
        assert got == [{"vhost": vh, "value": {"max-queues": 1, "max-connections": 1}}]
        params = pika.URLParameters(broker.url)
        params.virtual_host = vh
        conn = pika.BlockingConnection(params)
        try:
            ch = conn.channel()
            ch.queue_declare("one")
            with pytest.raises(ChannelClosedByBroker) as e:
                ch.queue_declare("two")
            assert e.value.reply_code == 406
            assert e.value.reply_text == (f"PRECONDITION_FAILED - cannot declare queue 'two': "
                                          f"queue limit in vhost '{vh}' (1) is reached")
            with pytest.raises(pika.exceptions.ProbableAccessDeniedError) as e:
                pika.BlockingConnection(params)
            assert "connection limit (1) is reached" in str(e.value)
        finally:
            conn.close()
        r = requests.put(f"{lim}/max-nonsense", json={"value": 1}, auth=AUTH)
        assert r.status_code == 400
        assert requests.delete(f"{lim}/max-queues", auth=AUTH).status_code == 204
        assert requests.get(lim, auth=AUTH).json() == [{"vhost": vh, "value": {"max-connections": 1}}]
    finally:
        requests.delete(base, auth=AUTH)


@contextlib.contextmanager
def _vhost_connection(api_url, broker, vh):
    """A pika connection to a fresh vhost `vh`, deleted afterwards."""
    assert requests.put(f"{api_url}/api/vhosts/{q(vh)}", auth=AUTH).status_code in (201, 204)
    try:
        requests.put(f"{api_url}/api/permissions/{q(vh)}/guest", auth=AUTH,
                     json={"configure": ".*", "write": ".*", "read": ".*"})
        params = pika.URLParameters(broker.url)
        params.virtual_host = vh
        c = pika.BlockingConnection(params)
        try:
            yield c
        finally:
            if c.is_open:
                c.close()
    finally:
        requests.delete(f"{api_url}/api/vhosts/{q(vh)}", auth=AUTH)


def test_vhost_message_stats(api_url, broker, name):
    import time
    vh = name
    with _vhost_connection(api_url, broker, vh) as c:
        ch = c.channel()
        ch.confirm_delivery()
        ch.queue_declare("work")
        for i in range(3):
            ch.basic_publish("", "work", b"m")
        m, _, _ = ch.basic_get("work")
        ch.basic_ack(m.delivery_tag)
        deadline = time.time() + 15
        while True:  # RabbitMQ collects its stats every 5 s
            v = requests.get(f"{api_url}/api/vhosts/{q(vh)}", auth=AUTH).json()
            stats = v.get("message_stats", {})
            if (stats.get("ack"), v.get("messages")) == (1, 2) or time.time() > deadline:
                break
            time.sleep(0.5)
        assert stats["publish"] == 3
        assert stats["deliver_get"] == 1
        assert stats["ack"] == 1
        assert (v["messages"], v["messages_ready"], v["messages_unacknowledged"]) == (2, 2, 0)
        assert "rate" in stats["publish_details"]


@pytest.mark.parametrize("kind", ["vhost", "user"])
def test_deleting_a_vhost_or_user_closes_its_connections(api_url, broker, name, kind):
    import time
    from pika.exceptions import ConnectionClosedByBroker
    vh, user = (name, "guest") if kind == "vhost" else ("/", name)
    if kind == "vhost":
        requests.put(f"{api_url}/api/vhosts/{q(vh)}", auth=AUTH)
    else:
        requests.put(f"{api_url}/api/users/{q(user)}", json={"password": "p", "tags": ""}, auth=AUTH)
    requests.put(f"{api_url}/api/permissions/{q(vh)}/{q(user)}", auth=AUTH,
                 json={"configure": ".*", "write": ".*", "read": ".*"})
    params = pika.URLParameters(broker.url)
    params.virtual_host = vh
    if kind == "user":
        params.credentials = pika.PlainCredentials(user, "p")
    c = pika.BlockingConnection(params)
    target = q(vh) if kind == "vhost" else q(user)
    assert requests.delete(f"{api_url}/api/{kind}s/{target}", auth=AUTH).status_code == 204
    with pytest.raises(ConnectionClosedByBroker) as e:
        deadline = time.time() + 5
        while time.time() < deadline:
            c.process_data_events(0.1)
    what = vh if kind == "vhost" else user
    # RabbitMQ 3.10 says "is down" instead when its vhost supervisor stops first (a race
    # its consumers can lose); "is deleted" is the usual text.
    assert (e.value.reply_code, e.value.reply_text) == (
        320, f"CONNECTION_FORCED - {kind} '{what}' is deleted")


def test_channel_message_stats(api_url, broker, name):
    """Per-channel counters as RabbitMQ's /api/channels shows them: a publishing channel
    with confirms, unroutable messages and basic.get, and a consuming channel whose
    nacked deliveries come back redelivered; each group only once it moved."""
    import time
    vh = name
    with _vhost_connection(api_url, broker, vh) as c:
        ch = c.channel()
        ch.queue_declare("work")
        ch.confirm_delivery()
        for _ in range(5):
            ch.basic_publish("", "work", b"m")
        ch.basic_publish("", "nowhere", b"m")
        with pytest.raises(pika.exceptions.UnroutableError):
            ch.basic_publish("", "nowhere", b"m", mandatory=True)
        m, _, _ = ch.basic_get("work")
        ch.basic_ack(m.delivery_tag)
        ch.basic_get("work", auto_ack=True)
        ch2 = c.channel()
        ch2.basic_qos(prefetch_count=10)
        tags = []
        ch2.basic_consume("work", lambda _c, m, _p, _b: tags.append(m.delivery_tag))
        while len(tags) < 3:
            c.process_data_events(0.2)
        ch2.basic_nack(tags[-1], multiple=True, requeue=True)
        while len(tags) < 6:
            c.process_data_events(0.2)
        deadline = time.time() + 15
        while True:  # RabbitMQ collects its stats every 5 s
            chans = requests.get(f"{api_url}/api/vhosts/{q(vh)}/channels", auth=AUTH).json()
            chans.sort(key=lambda x: x["number"])
            stats = [x.get("message_stats", {}) for x in chans]
            if (len(stats) == 2 and stats[1].get("redeliver") == 3) or time.time() > deadline:
                break
            time.sleep(0.5)
        pub, cons = stats
        assert {k: pub[k] for k in ("publish", "confirm", "drop_unroutable", "return_unroutable",
                                    "get", "get_no_ack", "ack", "deliver_get")} == {
            "publish": 7, "confirm": 7, "drop_unroutable": 1, "return_unroutable": 1,
            "get": 1, "get_no_ack": 1, "ack": 1, "deliver_get": 2}
        assert {k: cons[k] for k in ("deliver", "redeliver", "deliver_get", "ack")} == {
            "deliver": 6, "redeliver": 3, "deliver_get": 6, "ack": 0}
        assert "publish" not in cons
        assert "rate" in pub["publish_details"]
        assert chans[0]["messages_unconfirmed"] == 0


def test_global_parameters_and_cluster_name(api_url, broker, name):
    """rabbit-hole's global-parameter and cluster-name specs: RabbitMQ sets cluster_name
    and internal_cluster_id itself; the cluster name is also in the AMQP server properties."""
    base = f"{api_url}/api/global-parameters"
    listed = {p["name"]: p["value"] for p in requests.get(base, auth=AUTH).json()}
    assert {"cluster_name", "internal_cluster_id"} <= set(listed)
    assert listed["internal_cluster_id"].startswith("rabbitmq-cluster-id-")
    assert requests.put(f"{base}/{name}", json={"value": {"a": [1, 2]}}, auth=AUTH).status_code == 201
    assert requests.put(f"{base}/{name}", json={"name": name, "value": "v2"}, auth=AUTH).status_code == 204
    assert requests.get(f"{base}/{name}", auth=AUTH).json() == {"name": name, "value": "v2"}
    r = requests.put(f"{base}/{name}-x", json={}, auth=AUTH)
    assert (r.status_code, r.json()["reason"]) == (400, "[{key_missing,value}]")
    exported = requests.get(f"{api_url}/api/definitions", auth=AUTH).json()["global_parameters"]
    assert {"name": name, "value": "v2"} in exported
    assert requests.delete(f"{base}/{name}", auth=AUTH).status_code == 204
    assert requests.delete(f"{base}/{name}", auth=AUTH).status_code == 404
    assert requests.get(f"{base}/{name}", auth=AUTH).status_code == 404

    before = requests.get(f"{api_url}/api/cluster-name", auth=AUTH).json()["name"]
    assert before == listed["cluster_name"]
    try:
        assert requests.put(f"{api_url}/api/cluster-name", json={"name": name}, auth=AUTH).status_code == 204
        assert requests.get(f"{api_url}/api/cluster-name", auth=AUTH).json() == {"name": name}
        assert requests.get(f"{api_url}/api/overview", auth=AUTH).json()["cluster_name"] == name
        conn = pika.BlockingConnection(pika.URLParameters(broker.url))
        try:
            assert conn._impl.server_properties["cluster_name"] == name
        finally:
            conn.close()
        r = requests.put(f"{api_url}/api/cluster-name", json={}, auth=AUTH)
        assert (r.status_code, r.json()["reason"]) == (400, "[{key_missing,name}]")
    finally:
        requests.put(f"{api_url}/api/cluster-name", json={"name": before}, auth=AUTH)


def test_feature_flags_queue_actions_and_vhost_cluster_state(api_url, name):
    flags = requests.get(f"{api_url}/api/feature-flags", auth=AUTH).json()
    by_name = {f["name"]: f for f in flags}
    for f in ("quorum_queue", "stream_queue", "user_limits", "virtual_host_metadata"):
        assert by_name[f]["state"] == "enabled" and by_name[f]["stability"] == "stable"
    assert requests.put(f"{api_url}/api/feature-flags/quorum_queue/enable", json={}, auth=AUTH).status_code == 204
    r = requests.put(f"{api_url}/api/feature-flags/{name}/enable", json={}, auth=AUTH)
    assert (r.status_code, r.json()["reason"]) == (400, "unsupported")

    base = f"{api_url}/api/queues/%2F/{q(name)}"
    assert requests.put(base, json={"durable": False}, auth=AUTH).status_code == 201
    try:
        for action in ("sync", "cancel_sync"):
            assert requests.post(f"{base}/actions", json={"action": action}, auth=AUTH).status_code == 204
        r = requests.post(f"{base}/actions", json={"action": "bogus"}, auth=AUTH)
        assert (r.status_code, r.json()) == (400, {"error": "bad_request", "reason": ["unknown", "bogus"]})
        r = requests.post(f"{base}/actions", json={}, auth=AUTH)
        assert (r.status_code, r.json()["reason"]) == (400, "[{key_missing,action}]")
    finally:
        requests.delete(base, auth=AUTH)

    node = requests.get(f"{api_url}/api/overview", auth=AUTH).json()["node"]
    assert requests.get(f"{api_url}/api/vhosts/%2F", auth=AUTH).json()["cluster_state"] == {node: "running"}


def test_user_password_hash_must_be_base64_and_one_topic_permission_goes(api_url, name):
    r = requests.put(f"{api_url}/api/users/{name}", auth=AUTH,
                     json={"password_hash": "s3krE7-s3t-v!a-4A$h", "hashing_algorithm": "rabbit_password_hashing_sha256",
                           "tags": ""})
    assert (r.status_code, r.json()["reason"]) == (400, ["not_base64", "s3krE7-s3t-v!a-4A$h"])
    assert requests.get(f"{api_url}/api/users/{name}", auth=AUTH).status_code == 404
    assert requests.put(f"{api_url}/api/users/{name}", json={"password": "pw", "tags": ""}, auth=AUTH).status_code == 201
    try:
        base = f"{api_url}/api/topic-permissions/%2F/{name}"
        for x in ("amq.topic", "amq.direct"):
            assert requests.put(base, json={"exchange": x, "write": ".*", "read": ".*"}, auth=AUTH).status_code in (201, 204)
        assert requests.delete(f"{base}/amq.direct", auth=AUTH).status_code == 204
        assert [p["exchange"] for p in requests.get(base, auth=AUTH).json()] == ["amq.topic"]
    finally:
        requests.delete(f"{api_url}/api/users/{name}", auth=AUTH)


def test_what_rabbitmqadmin_reads(api_url, broker, name):
    """Answers rabbitmqadmin prints as they come: reasons without the AMQP code name for
    declarations, a channel's code and text for a publish, `[]` for no properties, consumer
    arguments as given, the queue fields its `list queues` columns name."""
    base = f"{api_url}/api/queues/%2F/{q(name)}"
    assert requests.put(base, json={"durable": False}, auth=AUTH).status_code == 201
    r = requests.put(base, json={"durable": True}, auth=AUTH)
    assert (r.status_code, r.json()["reason"]) == (
        400, f"inequivalent arg 'durable' for queue '{name}' in vhost '/': received 'true' but current is 'false'")
    r = requests.put(f"{api_url}/api/exchanges/%2F/{q(name)}", json={"type": "bogus"}, auth=AUTH)
    assert (r.status_code, r.json()["reason"]) == (400, "invalid exchange type 'bogus'")
    for path in ("permissions", "topic-permissions"):
        r = requests.put(f"{api_url}/api/{path}/%2F/{q(name)}-nobody", auth=AUTH,
                         json={"configure": ".*", "write": ".*", "read": ".*", "exchange": "amq.topic"})
        assert (r.status_code, r.json()["reason"]) == (400, "vhost_or_user_not_found")
    publish = f"{api_url}/api/exchanges/%2F/amq.default/publish"
    r = requests.post(publish, auth=AUTH, json={"properties": {"user_id": "other"}, "routing_key": name,
                                                 "payload": "x", "payload_encoding": "string"})
    assert (r.status_code, r.json()["reason"]) == (
        400, "406 PRECONDITION_FAILED - user_id property set to 'other' but authenticated user was 'guest'")
    r = requests.post(publish, auth=AUTH, json={"properties": {}, "routing_key": name, "payload": "p",
                                                 "payload_encoding": "string"})
    assert r.json() == {"routed": True}
    got = requests.post(f"{base}/get", auth=AUTH, json={"count": 1, "ackmode": "ack_requeue_true", "encoding": "auto"})
    assert got.json()[0]["properties"] == []
    r = requests.post(f"{base}/get", auth=AUTH, json={"count": 1, "ackmode": "ack_requeue_true", "encoding": "x"})
    assert r.json()["reason"] == "Unsupported encoding. Please use auto or base64."
    conn = pika.BlockingConnection(pika.URLParameters(broker.url))
    try:
        ch = conn.channel()
        ch.basic_consume(name, lambda *a: None, consumer_tag="ct", arguments={"x-priority": 5})
        import time
        deadline = time.time() + 15
        consumers = []
        while not consumers and time.time() < deadline:  # RabbitMQ lists consumers after its stats interval
            conn.process_data_events(0.5)
            consumers = [c for c in requests.get(f"{api_url}/api/consumers/%2F", auth=AUTH).json()
                         if c["queue"]["name"] == name]
        assert consumers and consumers[0]["arguments"] == {"x-priority": 5}
        assert "priority" not in consumers[0]
        info = requests.get(base, auth=AUTH).json()
        for k in ("memory", "messages_persistent", "message_bytes_persistent", "message_bytes_ram",
                  "head_message_timestamp", "consumer_utilisation", "consumer_capacity"):
            assert k in info, k
    finally:
        conn.close()
    requests.delete(base, auth=AUTH)


def test_definitions_export_non_durable_objects(api_url, name):
    """RabbitMQ exports every queue but exclusive ones, durable or not, and every exchange;
    a vhost's export has only `rabbit_version` besides the objects."""
    vh = q(name)
    requests.put(f"{api_url}/api/vhosts/{vh}", auth=AUTH)
    try:
        requests.put(f"{api_url}/api/queues/{vh}/transient-q", json={"durable": False}, auth=AUTH)
        requests.put(f"{api_url}/api/exchanges/{vh}/transient-x", json={"type": "fanout", "durable": False}, auth=AUTH)
        requests.post(f"{api_url}/api/bindings/{vh}/e/transient-x/q/transient-q", json={"routing_key": ""}, auth=AUTH)
        d = requests.get(f"{api_url}/api/definitions/{vh}", auth=AUTH).json()
        assert [(x["name"], x["durable"]) for x in d["queues"]] == [("transient-q", False)]
        assert [(x["name"], x["durable"]) for x in d["exchanges"]] == [("transient-x", False)]
        assert [(b["source"], b["destination"]) for b in d["bindings"]] == [("transient-x", "transient-q")]
        assert sorted(d) == ["bindings", "exchanges", "parameters", "policies", "queues", "rabbit_version"]
    finally:
        requests.delete(f"{api_url}/api/vhosts/{vh}", auth=AUTH)


def test_policies_as_runtime_parameters(api_url, name):
    """RabbitMQ keeps policies as runtime parameters (components `policy` and
    `operator_policy`); the top-level list leaves `policy` out; an unknown component is a
    400 on PUT."""
    vh = q(name)
    requests.put(f"{api_url}/api/vhosts/{vh}", auth=AUTH)
    try:
        requests.put(f"{api_url}/api/operator-policies/{vh}/op1", auth=AUTH,
                     json={"pattern": "^q", "definition": {"max-length": 100}, "apply-to": "queues"})
        requests.put(f"{api_url}/api/policies/{vh}/p1", auth=AUTH,
                     json={"pattern": "^q", "definition": {"max-length": 5}, "apply-to": "queues"})
        op1 = {"component": "operator_policy", "name": "op1", "vhost": name,
               "value": {"pattern": "^q", "definition": {"max-length": 100}, "apply-to": "queues", "priority": 0}}
        mine = lambda r: [p for p in r.json() if p["vhost"] == name]
        assert mine(requests.get(f"{api_url}/api/parameters", auth=AUTH)) == [op1]
        assert mine(requests.get(f"{api_url}/api/parameters/operator_policy", auth=AUTH)) == [op1]
        assert requests.get(f"{api_url}/api/parameters/operator_policy/{vh}/op1", auth=AUTH).json() == op1
        assert [p["name"] for p in requests.get(f"{api_url}/api/parameters/policy/{vh}", auth=AUTH).json()] == ["p1"]
        r = requests.put(f"{api_url}/api/parameters/bogus-comp/{vh}/x", auth=AUTH, json={"value": {"a": 1}})
        assert (r.status_code, r.json()["reason"]) == (400, "Validation failed\n\ncomponent bogus-comp not found\n")
    finally:
        requests.delete(f"{api_url}/api/vhosts/{vh}", auth=AUTH)
