"""Small helpers shared by the pika tests."""
import time

import pika
import pytest
from pika.exceptions import ChannelClosedByBroker, ConnectionClosedByBroker


def drain(ch, queue, limit=10000):
    """Bodies of every ready message of `queue`, by basic.get with auto-ack."""
    out = []
    for _ in range(limit):
        method, _props, body = ch.basic_get(queue, auto_ack=True)
        if method is None:
            break
        out.append(body)
    return out


def get(ch, queue, timeout=3.0, auto_ack=True):
    """basic.get, retried until a message arrives (routing through exchanges and
    dead-lettering are asynchronous in both brokers)."""
    deadline = time.time() + timeout
    while True:
        method, props, body = ch.basic_get(queue, auto_ack=auto_ack)
        if method is not None or time.time() > deadline:
            return method, props, body
        time.sleep(0.02)


def wait_ready(ch, queue, n, timeout=3.0):
    """Waits until `queue` has at least `n` ready messages; returns the count."""
    deadline = time.time() + timeout
    while True:
        count = ch.queue_declare(queue, passive=True).method.message_count
        if count >= n or time.time() > deadline:
            return count
        time.sleep(0.02)


def pump(conn, until, seconds=2.0):
    """Processes events until `until()` holds (or time runs out), then a little longer so
    that extra deliveries would show."""
    deadline = time.time() + seconds
    while not until() and time.time() < deadline:
        conn.process_data_events(time_limit=0.05)
    conn.process_data_events(time_limit=0.2)


def channel_error(conn, fn):
    """Runs fn(channel) on a new channel of `conn` and returns the ChannelClosedByBroker it
    must raise (fn may have to make a synchronous call for an asynchronous error to show)."""
    ch = conn.channel()
    with pytest.raises(ChannelClosedByBroker) as e:
        fn(ch)
    assert conn.is_open, "a channel error must not close the connection"
    return e.value


def connection_error(url, fn):
    """Runs fn(channel) on a new connection and returns the ConnectionClosedByBroker."""
    c = pika.BlockingConnection(pika.URLParameters(url))
    try:
        with pytest.raises(ConnectionClosedByBroker) as e:
            fn(c.channel())
    finally:
        if c.is_open:
            c.close()
    return e.value


def sync(ch):
    """A synchronous round trip on `ch`, so that an asynchronous error (after basic.publish
    or basic.ack) arrives before the test goes on."""
    ch.exchange_declare("amq.direct", passive=True)


def connect(url, attempts_for=20.0, **params):
    """A BlockingConnection, retrying while the broker is (re)starting."""
    p = pika.URLParameters(url)
    for k, v in params.items():
        setattr(p, k, v)
    deadline = time.time() + attempts_for
    while True:
        try:
            return pika.BlockingConnection(p)
        except pika.exceptions.AMQPConnectionError:
            if time.time() > deadline:
                raise
            time.sleep(0.1)
