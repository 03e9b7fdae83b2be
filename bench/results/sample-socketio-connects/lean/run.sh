#!/usr/bin/env bash
# Ad hoc (not part of bench/socketio.sh): sample-socketio/callgrind/run.sh for
# two router binaries. The router under callgrind on the plain path and on the
# Socket.IO path, instrumentation on just before the throughput load; one run
# per VARIANT-PATH in the order given, VARIANT = before | after, PATH = chat | socketio.
#   BENCH=/tmp/bench-sio/after run.sh OUTDIR after-chat before-chat before-socketio after-socketio
# Routers: $BENCH_ROOT/<variant>/target/release/wsrouter; loadgen, echo_backend and
# bench/socketio.toml from $BENCH (the after tree). LOADGEN_EXTRA (unset for the
# main runs) is appended to both loadgen command lines, e.g. LOADGEN_EXTRA=--text.
set -euo pipefail
out=$1; shift
BENCH_ROOT=${BENCH_ROOT:-/tmp/bench-sio}
R=${BENCH:-$BENCH_ROOT/after}
mkdir -p "$out"
for vp in "$@"; do
    v=${vp%%-*}; p=${vp#*-}
    bin=$BENCH_ROOT/$v/target/release/wsrouter
    case "$p" in
        chat) url=ws://127.0.0.1:18080/chat ;;
        socketio) url='ws://127.0.0.1:18080/socket.io/?EIO=4&transport=websocket' ;;
        *) echo "chat or socketio" >&2; exit 64 ;;
    esac
    echo "[callgrind $(date +%H:%M:%S)] $vp load $(cut -d' ' -f1-3 /proc/loadavg)" >&2
    "$R/target/release/echo_backend" --listen 127.0.0.1:19001 2>/dev/null &
    be=$!
    RUST_LOG=warn valgrind --tool=callgrind --instr-atstart=no --callgrind-out-file="$out/cg-$vp.out" \
        "$bin" --config "$R/bench/socketio.toml" 2>"$out/valgrind-$vp.log" &
    rt=$!
    for _ in $(seq 100); do curl -fsS -o /dev/null http://127.0.0.1:19090/readyz 2>/dev/null && break; sleep 0.2; done
    # one upgrade through, then instrumentation on
    "$R/target/release/loadgen" throughput -c 1 --window 1 --size 64 --duration 1s --warmup 0s \
        --url "$url" ${LOADGEN_EXTRA:-} >/dev/null 2>&1 || true
    callgrind_control -i on "$rt" >/dev/null
    "$R/target/release/loadgen" throughput -c 50 --window 16 --size 64 --duration 8s --warmup 1s \
        --url "$url" ${LOADGEN_EXTRA:-} >"$out/loadgen-$vp.json" 2>"$out/loadgen-$vp.err"
    callgrind_control -i off "$rt" >/dev/null
    kill -TERM "$rt"; wait "$rt" || true
    kill -TERM "$be"; wait "$be" || true
    echo "[callgrind $(date +%H:%M:%S)] $vp done, load $(cut -d' ' -f1-3 /proc/loadavg)" >&2
done
