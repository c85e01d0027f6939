#!/usr/bin/env python3
"""Broker RSS growth per idle MQTT connection (docs/PERFORMANCE.md).

Opens N MQTT 3.1.1 connections (clean session, keep-alive 0, CONNECT + CONNACK, then
idle) and reports the broker's VmRSS growth per connection, read from /proc/<pid>/status.
With --subscribe each connection also subscribes (QoS 1) to its own command topic
`cmd/<client id>`, as a device waiting for commands does.

    ulimit -n 65536
    python3 tests/interop/mqtt_idle_rss.py --pid $(pidof warren) --port 1883 -n 10000
"""
import argparse
import socket
import struct
import time


def rss_kb(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def connect_packet(client_id):
    cid = client_id.encode()
    body = b"\x00\x04MQTT\x04\x02\x00\x00" + struct.pack(">H", len(cid)) + cid
    return bytes([0x10, len(body)]) + body


def subscribe_packet(topic):
    t = topic.encode()
    body = b"\x00\x01" + struct.pack(">H", len(t)) + t + b"\x01"
    return bytes([0x82, len(body)]) + body


def measure(pid, open_one, n, settle, label):
    """Opens 100 warm-up connections, then `n` more with `open_one(name)`, and prints the
    broker's RSS growth per connection (shared with stomp_idle_rss.py)."""
    # Warm up: the first connections pay one-off allocations (runtime, buffers, pools).
    warm = [open_one(f"warm-{i}") for i in range(100)]
    time.sleep(settle)
    before = rss_kb(pid)
    t0 = time.time()
    socks = [open_one(f"idle-{i}") for i in range(n)]
    took = time.time() - t0
    time.sleep(settle)
    after = rss_kb(pid)
    per = (after - before) * 1024 / n
    print(f"{label} connections={n} connect_time={took:.1f}s rss_before={before}KB "
          f"rss_after={after}KB growth={after - before}KB per_connection={per:.0f}B")
    for s in socks + warm:
        s.close()


def arguments(default_port):
    """The command line both idle-RSS scripts take."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--pid", type=int, required=True)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=default_port)
    ap.add_argument("-n", type=int, default=10000)
    ap.add_argument("--settle", type=float, default=3.0)
    ap.add_argument("--subscribe", action="store_true")
    return ap.parse_args()


def main():
    a = arguments(1883)

    def open_one(client_id):
        s = socket.create_connection((a.host, a.port))
        s.sendall(connect_packet(client_id))
        ack = s.recv(4)
        assert ack[:2] == b"\x20\x02" and ack[3] == 0, ack
        if a.subscribe:
            s.sendall(subscribe_packet(f"cmd/{client_id}"))
            suback = s.recv(5)
            assert suback[:1] == b"\x90" and suback[4] == 1, suback
        return s

    measure(a.pid, open_one, a.n, a.settle, f"subscribed={a.subscribe}")


if __name__ == "__main__":
    main()
