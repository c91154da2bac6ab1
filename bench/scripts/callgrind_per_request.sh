#!/usr/bin/env bash
# User-space instructions per request of one server under test, counted by
# callgrind: noise-free, so it shows small differences that req/s on a busy
# machine can not. Kernel time (the loopback TCP stack) is not counted.
#
#   bench/scripts/callgrind_per_request.sh FRAMEWORK MODE [REQUESTS]
#   e.g. bench/scripts/callgrind_per_request.sh axum atp 20000
#
# FRAMEWORK: axum | actix | rocket; MODE: atp | bare. Needs valgrind
# (apt-get install valgrind) and a release build of atp-bench.
set -euo pipefail
cd "$(dirname "$0")/../.."
fw=${1:?framework}; mode=${2:?mode}; n=${3:-20000}
bin=target/release/atp-bench
[ -x "$bin" ] || cargo build --release -p atp-bench
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
out=$(mktemp -d)/callgrind.out
valgrind --tool=callgrind --instr-atstart=no --callgrind-out-file="$out" \
  "$bin" serve --framework "$fw" --mode "$mode" --addr "127.0.0.1:$port" >/dev/null 2>&1 &
vg=$!
trap 'kill $vg 2>/dev/null || true' EXIT
# Ready, then warm (lazily built state, connection set-up), then counted.
"$bin" load --addr "127.0.0.1:$port" --warmup 0 --duration 120 --max-requests 500 \
  --connections 4 --no-pin >/dev/null 2>&1 || true
"$bin" load --addr "127.0.0.1:$port" --warmup 0 --duration 120 --max-requests 500 \
  --connections 4 --no-pin >/dev/null 2>&1
callgrind_control -i on "$vg" >/dev/null 2>&1
"$bin" load --addr "127.0.0.1:$port" --warmup 0 --duration 300 --max-requests "$n" \
  --connections 4 --no-pin >/dev/null 2>&1
callgrind_control -d "$vg" >/dev/null 2>&1
total=$(grep -h '^summary:' "$out"* | awk '{s += $2} END {print s}')
echo "$fw $mode: $((total / n)) instructions per request (user space, $n requests)"
echo "profile: callgrind_annotate --inclusive=yes $(ls -S "$out"* | head -1)"
