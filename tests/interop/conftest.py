"""Fixtures: a Warren broker started from the built binary, or an external broker.

Set AMQP_URL (e.g. amqp://guest:guest@127.0.0.1:5680/%2F for the reference RabbitMQ from
../shared/reference-brokers.sh) to run the same tests against another broker (with
MQTT_PORT, STOMP_PORT, WEB_STOMP_PORT and WEB_MQTT_PORT; reference: 1890, 61620, 15681,
15682); tests that
restart or kill the broker (the `warren` fixture) are then skipped, and tests marked
`warren_gap` are expected to pass.

Every queue and exchange a test declares through pika is deleted after the test (the
`_cleanup` fixture), so repeated runs against a long-lived RabbitMQ leave nothing behind.
Tests that declare through other clients (kombu, Celery) register their names with
`cleanup.queue(...)` / `cleanup.exchange(...)`.
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
from pika.adapters.blocking_connection import BlockingChannel

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


class Warren:
    """A warren process on free ports with its own data dir."""

    external = False

    def __init__(self):
        self.dir = tempfile.mkdtemp(prefix="warren-interop-")
        self.data_dir = os.path.join(self.dir, "data")
        self.log_path = os.path.join(self.dir, "warren.log")
        self.port = free_port()
        self.mqtt_port = free_port()
        self.stomp_port = free_port()
        self.web_stomp_port = free_port()
        self.web_mqtt_port = free_port()
        self.http_port = free_port()
        self.proc = None
        self.start()

    @property
    def url(self):
        return f"amqp://guest:guest@127.0.0.1:{self.port}/%2F"

    def start(self):
        binary = warren_bin()
        if not os.path.exists(binary):
            raise RuntimeError(f"{binary} not found: build it with `make build` or set WARREN_BIN")
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [binary, "--data-dir", self.data_dir,
             "--amqp-listen", f"127.0.0.1:{self.port}",
             "--mqtt-listen", f"127.0.0.1:{self.mqtt_port}",
             "--stomp-listen", f"127.0.0.1:{self.stomp_port}", "--http-listen", f"127.0.0.1:{self.http_port}",
             "--prometheus-listen", "off",
             "--web-stomp-listen", f"127.0.0.1:{self.web_stomp_port}",
             "--web-mqtt-listen", f"127.0.0.1:{self.web_mqtt_port}"],
            stdout=log, stderr=log, env={**os.environ, "WARREN_LOG": os.environ.get("WARREN_LOG", "info")})
        log.close()
        for p in (self.port, self.mqtt_port, self.stomp_port, self.web_stomp_port, self.web_mqtt_port,
                  self.http_port):
            self.wait_port(p)

    def wait_port(self, port, timeout=30.0):
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"warren exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                    return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"port {port} did not open:\n{self.log_tail()}")

    @property
    def api_url(self):
        return f"http://127.0.0.1:{self.http_port}"

    def stop(self, sig=signal.SIGTERM):
        """Sends `sig` and waits for the process; returns its exit code (negative: killed by
        a signal)."""
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def restart(self):
        code = self.stop()
        self.start()
        return code

    def kill9(self):
        self.stop(signal.SIGKILL)

    def log_tail(self, lines=40):
        try:
            with open(self.log_path, "rb") as f:
                return b"".join(f.readlines()[-lines:]).decode(errors="replace")
        except OSError:
            return ""

    def close(self):
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


class External:
    external = True

    def __init__(self, url):
        self.url = url
        self.mqtt_port = int(os.environ.get("MQTT_PORT", "1883"))
        self.stomp_port = int(os.environ.get("STOMP_PORT", "61613"))
        self.web_stomp_port = int(os.environ.get("WEB_STOMP_PORT", "15674"))
        self.web_mqtt_port = int(os.environ.get("WEB_MQTT_PORT", "15675"))
        # e.g. http://127.0.0.1:15680 for the reference RabbitMQ.
        self.api_url = os.environ.get("HTTP_API_URL")

    def log_tail(self, lines=40):
        return ""

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
    """The Warren process itself, for tests that restart or kill it."""
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


class Cleanup:
    def __init__(self):
        self.queues = []
        self.exchanges = []

    def queue(self, q):
        if q and q not in self.queues:
            self.queues.append(q)

    def exchange(self, x):
        if x and not x.startswith("amq.") and x not in self.exchanges:
            self.exchanges.append(x)

    def run(self, url):
        if not (self.queues or self.exchanges):
            return
        p = pika.URLParameters(url)
        p.connection_attempts = 1
        p.socket_timeout = 2
        p.blocked_connection_timeout = 5
        try:
            c = pika.BlockingConnection(p)
        except Exception:
            return  # the broker is gone (a failed restart test); nothing to clean
        try:
            ch = c.channel()
            for kind, names in (("queue", self.queues), ("exchange", self.exchanges)):
                for n in names:
                    try:
                        if not ch.is_open:
                            ch = c.channel()
                        if kind == "queue":
                            ch.queue_delete(n)
                        else:
                            ch.exchange_delete(n)
                    except Exception:
                        pass
        finally:
            try:
                c.close()
            except Exception:
                pass


@pytest.fixture(autouse=True)
def cleanup(broker, monkeypatch):
    """Records every queue and exchange declared through pika during the test and deletes
    them afterwards (on the broker the test used)."""
    rec = Cleanup()
    orig_q, orig_x = BlockingChannel.queue_declare, BlockingChannel.exchange_declare

    def queue_declare(self, queue, *a, **kw):
        r = orig_q(self, queue, *a, **kw)
        rec.queue(r.method.queue)
        return r

    def exchange_declare(self, exchange, *a, **kw):
        r = orig_x(self, exchange, *a, **kw)
        rec.exchange(exchange)
        return r

    monkeypatch.setattr(BlockingChannel, "queue_declare", queue_declare)
    monkeypatch.setattr(BlockingChannel, "exchange_declare", exchange_declare)
    yield rec
    rec.run(broker.url)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    if rep.when == "call" and rep.failed and "broker" in item.fixturenames:
        b = item.funcargs.get("broker")
        tail = b.log_tail() if b else ""
        if tail:
            rep.sections.append(("warren log (last lines)", tail))


def pytest_configure(config):
    config.addinivalue_line(
        "markers",
        "warren_gap(reason): RabbitMQ behaviour that Warren documents as missing; "
        "expected to fail against Warren, must pass against RabbitMQ")


def pytest_collection_modifyitems(config, items):
    if os.environ.get("AMQP_URL"):
        return
    for item in items:
        m = item.get_closest_marker("warren_gap")
        if m:
            item.add_marker(pytest.mark.xfail(reason="Warren gap: " + (m.args[0] if m.args else ""), strict=False))
