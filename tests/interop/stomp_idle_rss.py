#!/usr/bin/env python3
"""Broker RSS growth per idle STOMP connection (docs/PERFORMANCE.md).

Opens N STOMP 1.2 connections (CONNECT with heart-beat 0,0, then idle) and reports the
broker's VmRSS growth per connection, read from /proc/<pid>/status. With --subscribe each
connection also subscribes to its own `/topic/cmd.<i>` (a queue bound to amq.topic), as a
dashboard waiting for updates does.

    python3 tests/interop/stomp_idle_rss.py --pid $(pidof warren) --port 61613 -n 10000
"""
import socket

from mqtt_idle_rss import arguments, measure


def recv_frame(s):
    buf = b""
    while b"\0" not in buf:
        d = s.recv(4096)
        assert d, "connection closed"
        buf += d
    return buf


def main():
    a = arguments(61613)

    def open_one(name):
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

    measure(a.pid, open_one, a.n, a.settle, f"subscribed={a.subscribe}")


if __name__ == "__main__":
    main()
