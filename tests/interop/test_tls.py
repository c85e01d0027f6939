"""TLS with third-party clients: requests over HTTPS, websocket-client over WSS, pika with
SASL EXTERNAL and paho-mqtt with a client certificate (ssl_cert_login). The certificates
are made with the openssl CLI; the broker is its own process with a [tls] config (these
tests need Warren, not an external broker)."""
import os
import shutil
import ssl
import subprocess
import tempfile
import time

import paho.mqtt.client as mqtt
import pika
import pytest
import requests
import websocket

from conftest import Warren, free_port, warren_bin


def openssl(*args, cwd):
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def make_pki(d):
    """CA, server certificate for localhost, client certificates CN=alice and CN=mallory."""
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=Warren test CA",
            "-keyout", "ca.key", "-out", "ca.pem", cwd=d)
    leaves = [("server", "/CN=localhost", "subjectAltName=DNS:localhost\nextendedKeyUsage=serverAuth"),
              ("alice", "/O=Warren tests/CN=alice", "extendedKeyUsage=clientAuth"),
              ("mallory", "/CN=mallory", "extendedKeyUsage=clientAuth")]
    for name, subj, ext in leaves:
        with open(os.path.join(d, f"{name}.ext"), "w") as f:
            f.write(ext + "\n")
        openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", subj, "-keyout", f"{name}.key",
                "-out", f"{name}.csr", cwd=d)
        openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
                "-CAcreateserial", "-days", "2", "-extfile", f"{name}.ext", "-out", f"{name}.pem", cwd=d)


class TlsWarren(Warren):
    """A warren process with every TLS listener on and ssl_cert_login, plain ones off
    (but HTTP, for nothing here)."""

    def __init__(self, d):
        self.dir = d
        self.log_path = os.path.join(d, "warren.log")
        self.proc = None
        self.ports = {k: free_port() for k in ("amqps", "mqtts", "stomps", "https", "web_stomp_tls",
                                               "web_mqtt_tls")}
        with open(os.path.join(d, "warren.toml"), "w") as f:
            f.write("[listeners]\n")
            for k in ("amqp", "mqtt", "stomp", "http", "prometheus", "web_stomp", "web_mqtt"):
                f.write(f'{k} = "off"\n')
            for k, p in self.ports.items():
                f.write(f'{k} = "127.0.0.1:{p}"\n')
            f.write(f'[storage]\ndata_dir = "{d}/data"\n')
            f.write(f'[tls]\ncert_file = "{d}/server.pem"\nkey_file = "{d}/server.key"\n'
                    f'ca_file = "{d}/ca.pem"\nssl_cert_login = true\n')
        self.start()

    def start(self):
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen([warren_bin(), "--config", os.path.join(self.dir, "warren.toml")],
                                     stdout=log, stderr=log)
        log.close()
        for p in self.ports.values():
            self.wait_port(p)

    def amqps_params(self, who):
        """pika over TLS presenting `who`'s certificate, logging in with EXTERNAL."""
        ctx = ssl.create_default_context(cafile=os.path.join(self.dir, "ca.pem"))
        ctx.load_cert_chain(os.path.join(self.dir, f"{who}.pem"), os.path.join(self.dir, f"{who}.key"))
        return pika.ConnectionParameters(
            host="localhost", port=self.ports["amqps"], ssl_options=pika.SSLOptions(ctx, "localhost"),
            credentials=pika.credentials.ExternalCredentials(), connection_attempts=1)


@pytest.fixture(scope="module")
def tls_warren():
    if os.environ.get("AMQP_URL"):
        pytest.skip("starts its own Warren with a [tls] config")
    if not shutil.which("openssl"):
        pytest.skip("needs the openssl CLI")
    d = tempfile.mkdtemp(prefix="warren-tls-")
    make_pki(d)
    w = TlsWarren(d)  # close() removes d
    # alice exists (with a password nobody uses) and may use "/".
    https = f"https://localhost:{w.ports['https']}"
    kw = dict(auth=("guest", "guest"), verify=os.path.join(d, "ca.pem"),
              cert=(os.path.join(d, "alice.pem"), os.path.join(d, "alice.key")))
    assert requests.put(f"{https}/api/users/alice", json={"password": "unused", "tags": ""}, **kw).ok
    assert requests.put(f"{https}/api/permissions/%2F/alice",
                        json={"configure": ".*", "write": ".*", "read": ".*"}, **kw).ok
    yield w
    w.close()


def test_https_management_api(tls_warren):
    d = tls_warren.dir
    r = requests.get(f"https://localhost:{tls_warren.ports['https']}/api/overview", auth=("guest", "guest"),
                     verify=os.path.join(d, "ca.pem"), cert=(os.path.join(d, "alice.pem"), os.path.join(d, "alice.key")))
    assert r.status_code == 200
    protocols = {l["protocol"] for l in r.json()["listeners"]}
    assert {"amqp/ssl", "mqtt/ssl", "stomp/ssl", "https", "https/web-stomp", "https/web-mqtt"} <= protocols


def test_wss_stomp(tls_warren):
    d = tls_warren.dir
    ws = websocket.create_connection(
        f"wss://localhost:{tls_warren.ports['web_stomp_tls']}/ws", subprotocols=["v12.stomp"],
        sslopt={"ca_certs": os.path.join(d, "ca.pem"), "certfile": os.path.join(d, "alice.pem"),
                "keyfile": os.path.join(d, "alice.key")})
    try:
        ws.send("CONNECT\naccept-version:1.2\nhost:/\nlogin:guest\npasscode:guest\n\n\0")
        assert ws.recv().startswith("CONNECTED\n")
    finally:
        ws.close()


def test_pika_external_login(tls_warren):
    conn = pika.BlockingConnection(tls_warren.amqps_params("alice"))
    try:
        ch = conn.channel()
        q = ch.queue_declare("", exclusive=True).method.queue
        ch.basic_publish("", q, b"hello over EXTERNAL")
        _, _, body = next(ch.consume(q, auto_ack=True, inactivity_timeout=5))
        assert body == b"hello over EXTERNAL"
        # The API shows the TLS session and the mechanism, as RabbitMQ.
        d = tls_warren.dir
        r = requests.get(f"https://localhost:{tls_warren.ports['https']}/api/connections", auth=("guest", "guest"),
                         verify=os.path.join(d, "ca.pem"),
                         cert=(os.path.join(d, "alice.pem"), os.path.join(d, "alice.key")))
        [c] = [c for c in r.json() if c["user"] == "alice"]
        assert c["ssl"] is True and c["auth_mechanism"] == "EXTERNAL", c
        assert c["ssl_protocol"] in ("tlsv1.2", "tlsv1.3") and c["ssl_cipher"], c
    finally:
        conn.close()


def test_pika_external_unknown_user_is_refused(tls_warren):
    with pytest.raises(pika.exceptions.ProbableAuthenticationError):
        pika.BlockingConnection(tls_warren.amqps_params("mallory"))


def mqtt_connect(tls_warren, who):
    d = tls_warren.dir
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"tls-{who}", protocol=mqtt.MQTTv311)
    c.tls_set(ca_certs=os.path.join(d, "ca.pem"), certfile=os.path.join(d, f"{who}.pem"),
              keyfile=os.path.join(d, f"{who}.key"))
    result = {}
    c.on_connect = lambda client, userdata, flags, rc, props=None: result.setdefault("rc", rc)
    c.connect("localhost", tls_warren.ports["mqtts"])
    c.loop_start()
    deadline = time.time() + 5
    while "rc" not in result and time.time() < deadline:
        time.sleep(0.05)
    c.loop_stop()
    c.disconnect()
    return result.get("rc")


def test_paho_certificate_login(tls_warren):
    # No username: the certificate's CN (alice) logs in; mallory is no user.
    assert mqtt_connect(tls_warren, "alice") == 0
    # CONNACK 4 (paho 2 reports it as the 5.0 reason "Bad user name or password").
    rc = mqtt_connect(tls_warren, "mallory")
    assert rc is not None and rc.is_failure and "user name or password" in str(rc).lower(), rc
