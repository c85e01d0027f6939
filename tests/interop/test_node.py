"""Node clients over WebSocket (@stomp/stompjs, mqtt.js) and the live example in headless
Chromium, run with `node --test` against the same broker as the Python tests."""
import os
import shutil
import subprocess

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
NODE_DIR = os.path.join(HERE, "node")
ROOT = os.path.dirname(os.path.dirname(HERE))


def run_node(broker, test_file, extra_env=None):
    if not os.path.isdir(os.path.join(NODE_DIR, "node_modules")):
        pytest.fail("tests/interop/node/node_modules missing: run `make interop` (npm install)")
    env = {
        **os.environ,
        "WEB_STOMP_URL": f"ws://127.0.0.1:{broker.web_stomp_port}/ws",
        "MQTT_URL": f"mqtt://127.0.0.1:{broker.mqtt_port}",
        "WEB_MQTT_URL": f"ws://127.0.0.1:{broker.web_mqtt_port}/ws",
        **(extra_env or {}),
    }
    p = subprocess.run(["node", "--test", test_file], cwd=NODE_DIR, env=env,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-2000:]


def test_stompjs_over_web_stomp(broker):
    run_node(broker, "stompjs.test.mjs")


def test_mqttjs_over_web_mqtt(broker):
    run_node(broker, "mqttjs.test.mjs")


def test_live_example_in_chromium(broker):
    chromium = os.environ.get("CHROMIUM", "/usr/bin/chromium")
    if not os.path.exists(chromium):
        pytest.fail(f"{chromium} missing: `make deps` installs Debian's chromium")
    if not os.path.isdir(os.path.join(ROOT, "examples", "live-vehicles", "node_modules")):
        pytest.fail("examples/live-vehicles/node_modules missing: run `make interop`")
    env = {"CHROMIUM": chromium}
    if os.environ.get("SCREENSHOT"):
        env["SCREENSHOT"] = os.environ["SCREENSHOT"]
    run_node(broker, "live_example.test.mjs", env)


def test_dashboard_in_chromium(broker):
    """The dashboard at / logs in, creates a queue, publishes and sees the count change.
    SCREENSHOT_DASHBOARD=path saves a screenshot of the queue page (docs/dashboard.png)."""
    chromium = os.environ.get("CHROMIUM", "/usr/bin/chromium")
    if not os.path.exists(chromium):
        pytest.fail(f"{chromium} missing: `make deps` installs Debian's chromium")
    if broker.external:
        pytest.skip("the dashboard is Warren's own page")
    env = {"CHROMIUM": chromium, "HTTP_API_URL": broker.api_url}
    if os.environ.get("SCREENSHOT_DASHBOARD"):
        env["SCREENSHOT_DASHBOARD"] = os.path.abspath(os.environ["SCREENSHOT_DASHBOARD"])
    run_node(broker, "dashboard.test.mjs", env)
