"""Fixtures: a Warren broker started from the built binary, or an external broker.

Set AMQP_URL (e.g. amqp://guest:guest@127.0.0.1:5680/ for the reference RabbitMQ from
../shared/reference-brokers.sh) to run the same tests against another broker; tests that
restart or kill the broker are then skipped.
"""
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid

import pika
import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))


def warren_bin():
    if os.environ.get("WARREN_BIN"):
        return os.environ["WARREN_BIN"]
    target = os.environ.get("CARGO_TARGET_DIR", os.path.expanduser("~/.cache/warren-target"))
    return os.path.join(target, "release", "warren")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port, timeout=20.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"port {port} did not open")


class Warren:
    """A warren process on free ports with its own data dir."""

    external = False

    def __init__(self):
        self.dir = tempfile.mkdtemp(prefix="warren-interop-")
        self.port = free_port()
        self.mqtt_port = free_port()
        self.http_port = free_port()
        self.proc = None
        self.start()

    @property
    def url(self):
        return f"amqp://guest:guest@127.0.0.1:{self.port}/%2F"

    def start(self):
        log = open(os.path.join(self.dir, "warren.log"), "ab")
        self.proc = subprocess.Popen(
            [warren_bin(), "--data-dir", os.path.join(self.dir, "data"),
             "--amqp-listen", f"127.0.0.1:{self.port}",
             "--mqtt-listen", f"127.0.0.1:{self.mqtt_port}", "--stomp-listen", "off", "--http-listen", f"127.0.0.1:{self.http_port}",
             "--web-stomp-listen", "off", "--web-mqtt-listen", "off"],
            stdout=log, stderr=log, env={**os.environ, "WARREN_LOG": os.environ.get("WARREN_LOG", "info")})
        wait_port(self.port)
        wait_port(self.mqtt_port)
        wait_port(self.http_port)

    @property
    def api_url(self):
        return f"http://127.0.0.1:{self.http_port}"

    def stop(self, sig=signal.SIGTERM):
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def restart(self):
        self.stop()
        self.start()

    def kill9(self):
        self.stop(signal.SIGKILL)

    def close(self):
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


class External:
    external = True

    def __init__(self, url):
        self.url = url
        self.mqtt_port = int(os.environ.get("MQTT_PORT", "1883"))
        # e.g. http://127.0.0.1:15680 for the reference RabbitMQ.
        self.api_url = os.environ.get("HTTP_API_URL")

    def close(self):
        pass


@pytest.fixture(scope="session")
def broker():
    url = os.environ.get("AMQP_URL")
    b = External(url) if url else Warren()
    yield b
    b.close()


@pytest.fixture
def warren(broker):
    if broker.external:
        pytest.skip("needs a Warren process it can restart")
    return broker


@pytest.fixture
def conn(broker):
    c = pika.BlockingConnection(pika.URLParameters(broker.url))
    yield c
    if c.is_open:
        c.close()


@pytest.fixture
def ch(conn):
    return conn.channel()


@pytest.fixture
def api_url(broker):
    """The management API's base URL (guest/guest)."""
    if not broker.api_url:
        pytest.skip("set HTTP_API_URL to test an external broker's management API")
    return broker.api_url


@pytest.fixture
def name():
    """A unique name prefix per test, so tests never share queues or exchanges."""
    return "t-" + uuid.uuid4().hex[:10]
