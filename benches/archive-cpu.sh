#!/bin/bash
# The change archiver's CPU at about 1,000 changes a second (docs/BENCHMARKS.md,
# "The change archive"). Three release workers on one Redis: A archives
# (--archive-dir), C is the same without the archive, B takes the load
# generator's clients; the archiver's CPU is A's minus C's over the run.
# Usage: cargo build --release -p omcb-worker -p omcb-loadgen
#        [RATE=2000] [DUR=30] benches/archive-cpu.sh
# RATE is toggles per second; about half change a box (uniform pattern).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
bin=$root/target/release
dir=$(mktemp -d)
rate=${RATE:-2000}
dur=${DUR:-30}
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  [ -f "$dir/redis.pid" ] && kill "$(cat "$dir/redis.pid")" 2>/dev/null || true
  sleep 1
  rm -rf "$dir"
}
trap cleanup EXIT
port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
redis-server --port "$port" --save '' --appendonly no --dir "$dir" --daemonize yes \
  --pidfile "$dir/redis.pid" --logfile "$dir/redis.log"
until redis-cli -p "$port" ping >/dev/null 2>&1; do sleep 0.1; done
openssl rand -hex 16 > "$dir/key"
start() { # name, extra flags
  # shellcheck disable=SC2086
  "$bin/omcb" serve --listen 127.0.0.1:0 --metrics-listen 127.0.0.1:0 \
    --redis "redis://127.0.0.1:$port" --origin-key-file "$dir/key" \
    --toggle-rate 100000 --toggle-burst 100000 --ip-toggle-rate 0 --ip-connect-rate 0 \
    --max-connections-per-ip 100000 $2 > "$dir/$1.out" 2> "$dir/$1.err" &
  pids+=($!)
  echo $! > "$dir/$1.pid"
}
start A "--archive-dir $dir/archive"
for n in A; do until grep -q listening "$dir/$n.out"; do sleep 0.1; done; done
start B ""
start C ""
for n in B C; do until grep -q listening "$dir/$n.out"; do sleep 0.1; done; done
url=$(grep listening "$dir/B.out" | sed 's/.*http:/ws:/')/ws
cpu() { awk '{print $14 + $15}' "/proc/$(cat "$dir/$1.pid")/stat"; }
seq0=$(redis-cli -p "$port" get '{main}:seq'); a0=$(cpu A); c0=$(cpu C); t0=$(date +%s.%N)
"$bin/omcb-loadgen" --url "$url" --clients 50 --rate "$rate" --duration "$dur" --json > "$dir/load.json" 2> "$dir/load.err" || true
a1=$(cpu A); c1=$(cpu C); t1=$(date +%s.%N); seq1=$(redis-cli -p "$port" get '{main}:seq')
sleep 2 # a block a second: let the last one land before sizing the archive
bytes=$(du -sb "$dir/archive" | cut -f1)
python3 - "$t0" "$t1" "$a0" "$a1" "$c0" "$c1" "${seq0:-0}" "${seq1:-0}" "$(getconf CLK_TCK)" "$bytes" <<'PY'
import sys
t0, t1, a0, a1, c0, c1, s0, s1, hz, size = map(float, sys.argv[1:])
t = t1 - t0; a = (a1 - a0) / hz; c = (c1 - c0) / hz; n = s1 - s0
print(f"{t:.1f} s, {n:.0f} changes ({n / t:.0f}/s); archiving worker {a / t * 100:.2f}% of a core, "
      f"the same without the archive {c / t * 100:.2f}%: the archiver {(a - c) / t * 100:.2f}% of a core; "
      f"archive {size:.0f} bytes, {size / s1 * 1e6 / 1e6:.2f} MB per million changes")
PY
uptime
