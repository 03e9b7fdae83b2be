#!/usr/bin/env bash
# Ad hoc (not part of bench/socketio.sh): why a long-poll costs wsrouter more
# CPU than HAProxy. For each proxy given, under the long-polling load of
# bench/socketio.sh (wrk -t 1 -c 50, bench/socketio-poll.lua, backend
# `echo_backend --http`):
#   1. system calls and context switches of the proxy over a 10 s wrk run
#      (perf stat, kernel tracepoints), per request wrk completed;
#   2. a 6 s CPU profile of the proxy (perf record -F 999, no call graph),
#      split by object (kernel, binary, libc), by function, and the
#      binary's and libc's functions alone.
#   ROUTER=/tmp/sio-head/target/release/wsrouter run.sh OUTDIR wsrouter haproxy
set -euo pipefail
out=$1; shift
R=$(cd "$(dirname "$0")/../../../.." && pwd)
B=$R/bench
bin=${ROUTER:-$R/target/release/wsrouter}
mkdir -p "$out"
wrk_run() { POLL_KEYS=50 timeout 60 wrk -t 1 -c 50 -d "$1" --timeout 5s -s "$B/socketio-poll.lua" http://127.0.0.1:18080/; }
for v in "$@"; do
    echo "[poll-profile $(date +%H:%M:%S)] $v load $(cut -d' ' -f1-3 /proc/loadavg)" >&2
    "$R/target/release/echo_backend" --http --listen 127.0.0.1:19001 2>/dev/null &
    be=$!
    case "$v" in
        wsrouter) RUST_LOG=warn "$bin" --config "$B/socketio.toml" 2>/dev/null & ;;
        haproxy) haproxy -db -f "$B/haproxy-socketio.cfg" 2>/dev/null & ;;
    esac
    px=$!
    for _ in $(seq 100); do curl -fsS -o /dev/null 'http://127.0.0.1:18080/socket.io/?EIO=4&transport=polling&session=k01' 2>/dev/null && break; sleep 0.1; done
    wrk_run 1s >/dev/null 2>&1 || true
    # 1. system calls per request over a whole 10 s run
    perf stat -x, -e 'raw_syscalls:sys_enter,context-switches,task-clock' -p "$px" -o "$out/stat-$v.csv" -- sleep 10.3 &
    st=$!
    sleep 0.1
    wrk_run 10s | tail -1 >"$out/stat-wrk-$v.json"
    wait "$st" || true
    # 2. where the CPU goes
    wrk_run 8s | tail -1 >"$out/record-wrk-$v.json" &
    lg=$!
    sleep 1
    perf record -F 999 -p "$px" -o "$out/perf-$v.data" -- sleep 6 2>/dev/null >/dev/null || true
    wait "$lg" || true
    perf report -i "$out/perf-$v.data" --no-children --sort dso --stdio 2>/dev/null \
        | grep -v -e '^#' -e '^$' | sed -n 1,12p >"$out/dso-$v.txt" || true
    perf report -i "$out/perf-$v.data" --no-children --sort dso,symbol --stdio 2>/dev/null \
        | grep -v -e '^#' -e '^$' | sed -n 1,60p >"$out/symbols-$v.txt" || true
    # the proxy's own code and libc only, as a share of all its samples
    perf report -i "$out/perf-$v.data" --no-children --sort dso,symbol --dsos "$(basename "$(readlink -f "/proc/$px/exe")")",libc.so.6 \
        --stdio 2>/dev/null | grep -v -e '^#' -e '^$' | sed -n 1,40p >"$out/user-$v.txt" || true
    sed -i -E 's/[[:space:]]+-[[:space:]]+-[[:space:]]*$//; s/[[:space:]]+$//' "$out/dso-$v.txt" "$out/symbols-$v.txt" "$out/user-$v.txt"
    rm -f "$out/perf-$v.data" "$out/perf-$v.data.old"
    kill -TERM "$px"; wait "$px" || true
    kill -TERM "$be"; wait "$be" || true
done
# per request
for v in "$@"; do
    python3 - "$out" "$v" <<'PY'
import json, sys
out, v = sys.argv[1:]
n = json.load(open(f"{out}/stat-wrk-{v}.json"))["requests"]
c = {}
for line in open(f"{out}/stat-{v}.csv"):
    f = line.strip().split(",")
    if len(f) > 2 and f[0].replace(".", "").isdigit():
        c[f[2]] = float(f[0])
print(f"{v}: {n:,} requests; per request: {c.get('raw_syscalls:sys_enter', 0) / n:.2f} system calls, "
      f"{c.get('context-switches', 0) / n:.3f} context switches, {1000 * c.get('task-clock', 0) / n:.1f} µs CPU (task-clock)")
PY
done | tee "$out/per-request.txt"
