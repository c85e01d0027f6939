#!/usr/bin/env bash
# Runs warren-bench against Warren and the reference RabbitMQ alternately (A B A B …),
# prints one JSON line per run and a table of medians and ratios.
#   scripts/compare.sh [rounds]
# Needs ../shared/reference-brokers.sh (RabbitMQ on 5680) and a release build.
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${1:-3}
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/warren-target}"
cargo build --release -p warren -p warren-bench >/dev/null
bash ../shared/reference-brokers.sh start >/dev/null
BENCH=$CARGO_TARGET_DIR/release/warren-bench
DATA=$(mktemp -d)
"$CARGO_TARGET_DIR/release/warren" --data-dir "$DATA" --amqp-listen 127.0.0.1:5699 --mqtt-listen off \
  --stomp-listen off --http-listen off --web-stomp-listen off --web-mqtt-listen off >/dev/null 2>&1 &
WARREN_PID=$!
trap 'kill $WARREN_PID; rm -rf "$DATA"' EXIT
sleep 1
RABBIT_PID=$(pgrep -f 'beam.smp.*reference' | head -1 || pgrep beam.smp | head -1)
OUT=$(mktemp)
for round in $(seq "$ROUNDS"); do
  for scenario in "transient --messages 200000" "confirms --messages 100000" "fanout --messages 30000 --queues 10"; do
    $BENCH --url amqp://guest:guest@127.0.0.1:5699/%2f --scenario $scenario --label warren --broker-pid $WARREN_PID | tee -a "$OUT"
    $BENCH --url amqp://guest:guest@127.0.0.1:5680/%2f --scenario $scenario --label rabbitmq --broker-pid "$RABBIT_PID" | tee -a "$OUT"
  done
done
python3 - "$OUT" <<'PY'
import json, statistics, sys
runs = [json.loads(l) for l in open(sys.argv[1]) if l.startswith("{")]
print("\n| scenario | Warren msg/s | RabbitMQ msg/s | ratio | Warren CPU-s/M msgs | RabbitMQ CPU-s/M msgs | CPU ratio |")
print("|---|---|---|---|---|---|---|")
for sc in dict.fromkeys(r["scenario"] for r in runs):
    def med(label, key):
        v = [r[key] for r in runs if r["scenario"] == sc and r["label"] == label and r[key] is not None]
        return statistics.median(v) if v else float("nan")
    key = "deliveries_per_sec" if sc == "fanout" else "msgs_per_sec"
    w, r = med("warren", key), med("rabbitmq", key)
    wc, rc = med("warren", "broker_cpu_secs_per_million"), med("rabbitmq", "broker_cpu_secs_per_million")
    print(f"| {sc}{' (deliveries/s)' if sc == 'fanout' else ''} | {w:,.0f} | {r:,.0f} | {w/r:.2f}× | {wc:.1f} | {rc:.1f} | {wc/rc:.2f}× |")
PY
