#!/usr/bin/env python3
"""Whether a run's slow messages came alone or in bursts.

Reads `warren-bench --latency-log FILE` output (one `id sent_ns received_ns` line per
delivery) and prints, per file: p99, how many messages took longer than --over µs, and
how those group into bursts (slow messages whose send times lie within --gap ms of the
previous slow one). A stall of the whole machine delays every message sent during it, so
it shows as a burst, for a TCP relay as much as for a broker; a broker's own hiccups on
single messages show as singletons (docs/PERFORMANCE.md, "A pacer that yields to the
broker").

    scripts/latency_bursts.py relay.log warren-amqp.log --over 250
"""
import argparse


def analyse(path, over_us, gap_ms):
    rows = []
    with open(path) as f:
        for line in f:
            parts = line.split()
            if len(parts) == 3:
                rows.append(tuple(int(p) for p in parts))
    if not rows:
        return f"{path}: no deliveries"
    lat_us = sorted((r - s) / 1e3 for _, s, r in rows)
    p99 = lat_us[min(len(lat_us) - 1, int(len(lat_us) * 0.99))]
    slow = [(s / 1e6, (r - s) / 1e3) for _, s, r in sorted(rows, key=lambda x: x[1])
            if (r - s) / 1e3 > over_us]
    bursts = []  # [first send ms, last send ms, count, worst µs]
    for sent_ms, us in slow:
        if bursts and sent_ms - bursts[-1][1] < gap_ms:
            b = bursts[-1]
            b[1], b[2], b[3] = sent_ms, b[2] + 1, max(b[3], us)
        else:
            bursts.append([sent_ms, sent_ms, 1, us])
    alone = sum(1 for b in bursts if b[2] == 1)
    in_big = sum(b[2] for b in bursts if b[2] >= 5)
    longest = max((b[1] - b[0] for b in bursts), default=0.0)
    return (f"{path}: {len(rows)} deliveries, p99 {p99 / 1000:.3f} ms, {len(slow)} over "
            f"{over_us:g} µs in {len(bursts)} bursts ({alone} alone, {in_big} in bursts of "
            f"5 or more, the longest {longest:.1f} ms)")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("files", nargs="+")
    ap.add_argument("--over", type=float, default=250.0, help="slow above this many µs")
    ap.add_argument("--gap", type=float, default=2.0,
                    help="slow messages sent within this many ms belong to one burst")
    a = ap.parse_args()
    for f in a.files:
        print(analyse(f, a.over, a.gap))


if __name__ == "__main__":
    main()
