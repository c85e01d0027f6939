"""kombu, the messaging layer under Celery."""
import kombu


def test_simple_queue_round_trip(broker, name):
    with kombu.Connection(broker.url) as conn:
        q = conn.SimpleQueue(name)
        for i in range(10):
            q.put({"i": i})
        got = []
        for _ in range(10):
            m = q.get(timeout=5)
            got.append(m.payload["i"])
            m.ack()
        q.close()
        assert got == list(range(10))


def test_topic_exchange_consumer(broker, name):
    ex = kombu.Exchange(name, type="topic", durable=False)
    queue = kombu.Queue(name, ex, routing_key="orders.*", durable=False, auto_delete=True)
    received = []
    with kombu.Connection(broker.url) as conn:
        with conn.Consumer(queue, callbacks=[lambda body, msg: (received.append(body), msg.ack())]):
            producer = conn.Producer()
            producer.publish({"order": 1}, exchange=ex, routing_key="orders.created", declare=[ex])
            producer.publish({"order": 2}, exchange=ex, routing_key="payments.created")
            producer.publish({"order": 3}, exchange=ex, routing_key="orders.paid")
            while len(received) < 2:
                conn.drain_events(timeout=5)
    assert received == [{"order": 1}, {"order": 3}]
