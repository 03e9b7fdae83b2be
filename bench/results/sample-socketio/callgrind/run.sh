#!/usr/bin/env bash
# Ad hoc (not part of bench/socketio.sh): the router under callgrind on the
# plain path and on the Socket.IO path, instrumentation on just before the
# throughput load (the recipe of sample-restructure-cpu/callgrind/run.sh).
# One run per path, in the order given; ROUTER is the binary measured.
#   ROUTER=/tmp/sio-head/target/release/wsrouter run.sh OUTDIR chat socketio
set -euo pipefail
out=$1; shift
R=$(cd "$(dirname "$0")/../../../.." && pwd)
bin=${ROUTER:-$R/target/release/wsrouter}
mkdir -p "$out"
for v in "$@"; do
    case "$v" in
        chat) url=ws://127.0.0.1:18080/chat ;;
        socketio) url='ws://127.0.0.1:18080/socket.io/?EIO=4&transport=websocket' ;;
        *) echo "chat or socketio" >&2; exit 64 ;;
    esac
    echo "[callgrind $(date +%H:%M:%S)] $v load $(cut -d' ' -f1-3 /proc/loadavg)" >&2
    "$R/target/release/echo_backend" --listen 127.0.0.1:19001 2>/dev/null &
    be=$!
    RUST_LOG=warn valgrind --tool=callgrind --instr-atstart=no --callgrind-out-file="$out/cg-$v.out" \
        "$bin" --config "$R/bench/socketio.toml" 2>"$out/valgrind-$v.log" &
    rt=$!
    for _ in $(seq 100); do curl -fsS -o /dev/null http://127.0.0.1:19090/readyz 2>/dev/null && break; sleep 0.2; done
    # one upgrade through, then instrumentation on
    "$R/target/release/loadgen" throughput -c 1 --window 1 --size 64 --duration 1s --warmup 0s \
        --url "$url" >/dev/null 2>&1 || true
    callgrind_control -i on "$rt" >/dev/null
    "$R/target/release/loadgen" throughput -c 50 --window 16 --size 64 --duration 8s --warmup 1s \
        --url "$url" >"$out/loadgen-$v.json" 2>"$out/loadgen-$v.err"
    callgrind_control -i off "$rt" >/dev/null
    kill -TERM "$rt"; wait "$rt" || true
    kill -TERM "$be"; wait "$be" || true
    echo "[callgrind $(date +%H:%M:%S)] $v done, load $(cut -d' ' -f1-3 /proc/loadavg)" >&2
done
