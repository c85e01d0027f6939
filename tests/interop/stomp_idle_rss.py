#!/usr/bin/env python3
"""Broker RSS growth per idle STOMP connection (docs/PERFORMANCE.md).

Opens N STOMP 1.2 connections (CONNECT with heart-beat 0,0, then idle) and reports the
broker's VmRSS growth per connection, read from /proc/<pid>/status. With --subscribe each
connection also subscribes to its own `/topic/cmd.<i>` (a queue bound to amq.topic), as a
dashboard waiting for updates does.

    python3 tests/interop/stomp_idle_rss.py --pid $(pidof warren) --port 61613 -n 10000
"""
import argparse
import socket
import time


def rss_kb(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def recv_frame(s):
    buf = b""
    while b"\0" not in buf:
        d = s.recv(4096)
        assert d, "connection closed"
        buf += d
    return buf


def open_one(a, name):
    s = socket.create_connection((a.host, a.port))
    s.sendall(b"CONNECT\naccept-version:1.2\nhost:/\nlogin:guest\npasscode:guest\n"
              b"heart-beat:0,0\n\n\0")
    f = recv_frame(s)
    assert f.startswith(b"CONNECTED"), f
    if a.subscribe:
        s.sendall(f"SUBSCRIBE\nid:0\ndestination:/topic/cmd.{name}\nreceipt:r\n\n\0".encode())
        f = recv_frame(s)
        assert f.startswith(b"RECEIPT"), f
    return s


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--pid", type=int, required=True)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=61613)
    ap.add_argument("-n", type=int, default=10000)
    ap.add_argument("--settle", type=float, default=3.0)
    ap.add_argument("--subscribe", action="store_true")
    a = ap.parse_args()
    # Warm up: the first connections pay one-off allocations (runtime, buffers, pools).
    warm = [open_one(a, f"warm-{i}") for i in range(100)]
    time.sleep(a.settle)
    before = rss_kb(a.pid)
    t0 = time.time()
    socks = [open_one(a, str(i)) for i in range(a.n)]
    took = time.time() - t0
    time.sleep(a.settle)
    after = rss_kb(a.pid)
    per = (after - before) * 1024 / a.n
    print(f"subscribed={a.subscribe} connections={a.n} connect_time={took:.1f}s rss_before={before}KB "
          f"rss_after={after}KB growth={after - before}KB per_connection={per:.0f}B")
    for s in socks + warm:
        s.close()


if __name__ == "__main__":
    main()
