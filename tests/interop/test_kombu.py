"""kombu, the messaging layer under Celery (it talks AMQP through py-amqp, not pika)."""
import kombu


def test_simple_queue_round_trip(broker, name, cleanup):
    cleanup.queue(name)
    cleanup.exchange(name)
    with kombu.Connection(broker.url) as conn:
        q = conn.SimpleQueue(name)
        for i in range(10):
            q.put({"i": i})
        got = []
        for _ in range(10):
            m = q.get(timeout=5)
            got.append(m.payload["i"])
            m.ack()
        assert q.qsize() == 0
        q.close()
        assert got == list(range(10))


def test_topic_exchange_consumer(broker, name, cleanup):
    cleanup.queue(name)
    cleanup.exchange(name)
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


def test_compression_priority_and_reject(broker, name, cleanup):
    cleanup.queue(name)
    cleanup.exchange(name)
    ex = kombu.Exchange(name, type="direct", durable=False)
    queue = kombu.Queue(name, ex, routing_key="k", durable=False, max_priority=10)
    with kombu.Connection(broker.url) as conn:
        queue(conn.default_channel).declare()
        producer = conn.Producer(exchange=ex, routing_key="k")
        producer.publish({"n": "low"}, priority=1, compression="zlib")
        producer.publish({"n": "high"}, priority=9, compression="zlib", headers={"tag": "x"})
        q = conn.SimpleQueue(queue)
        first = q.get(timeout=5)
        assert first.payload == {"n": "high"}
        assert first.headers["tag"] == "x"
        assert first.headers["compression"] == "application/x-gzip"
        first.requeue()
        rest = [q.get(timeout=5) for _ in range(2)]
        # the consumer has no prefetch limit, so "low" may already sit in its buffer
        assert sorted((m.payload["n"], m.delivery_info["redelivered"]) for m in rest) == [("high", True), ("low", False)]
        rest[0].ack()
        rest[1].reject()
        assert q.qsize() == 0
        q.close()
