#!/usr/bin/env bash
# Broker instructions per message, counted by callgrind (docs/PERFORMANCE.md, "Instructions
# per message, counted by callgrind"). Instruction counts do not depend on how busy the
# machine is, so a change of a few percent shows where wall-clock A/B runs cannot.
#
#   scripts/callgrind.sh [--broker BIN] SCENARIO [MESSAGES] [-- extra warren-bench args]
#
# Starts BIN (default: the release `warren`) under callgrind on side ports, runs a
# 2,000-message warm-up, zeroes the counters, runs MESSAGES (default 20,000) with the raw
# client in a closed loop of 100, dumps, and prints the broker's instructions per message.
# Needs valgrind (Debian: valgrind) and a release build of warren and warren-bench.
set -euo pipefail
target="${CARGO_TARGET_DIR:-$HOME/.cache/warren-target}/release"
broker="$target/warren"
if [ "${1:-}" = "--broker" ]; then broker=$2; shift 2; fi
scenario=${1:?scenario: transient | mqtt-qos0 | mqtt-qos1 | stomp-queue | ...}
messages=${2:-20000}
shift $(( $# >= 2 ? 2 : 1 ))
[ "${1:-}" = "--" ] && shift
bench="$target/warren-bench"
dir=$(mktemp -d /tmp/warren-callgrind.XXXX)
valgrind --tool=callgrind --callgrind-out-file="$dir/cg.%p" "$broker" --data-dir "$dir/data" \
  --amqp-listen 127.0.0.1:35672 --mqtt-listen 127.0.0.1:31883 --stomp-listen 127.0.0.1:31613 \
  --http-listen off --web-stomp-listen off --web-mqtt-listen off --log-level warn \
  > "$dir/broker.log" 2>&1 &
pid=$!
trap 'kill $pid 2>/dev/null || true' EXIT
for _ in $(seq 1 240); do (exec 3<>/dev/tcp/127.0.0.1/31883) 2>/dev/null && break; sleep 0.5; done
run() {
  local n=$1
  shift
  "$bench" --scenario "$scenario" --client raw --inflight 100 --messages "$n" \
    --url amqp://guest:guest@127.0.0.1:35672/%2f --mqtt-port 31883 --stomp-port 31613 "$@"
}
run 2000 "$@" > /dev/null
callgrind_control -z $pid > /dev/null 2>&1
run "$messages" "$@" > "$dir/bench.json"
callgrind_control -d $pid > /dev/null 2>&1
kill $pid; wait $pid 2>/dev/null || true
trap - EXIT
ir=$(callgrind_annotate "$dir/cg.$pid.1" | awk '/PROGRAM TOTALS/ {gsub(",", "", $1); print $1; exit}')
echo "$scenario: $((ir / messages)) broker instructions per message ($ir in all; profile $dir/cg.$pid.1)"
