#!/usr/bin/env bash
# Ad hoc (not part of bench/): the router under callgrind, instrumentation on
# just before the throughput load (the recipe in BENCHMARKS.md "Memory bounds
# (issue 11)"), from sample-read-watermark-fix-cpu/callgrind. One run per binary, in the order given.
#   run.sh OUTDIR before mid after   (mid: /work/wt-mid, b99c04a)
set -euo pipefail
out=$1; shift
A=/work/wt-after
mkdir -p "$out"
for v in "$@"; do
    bin=/work/wt-$v/target/release/wsrouter
    echo "[callgrind $(date +%H:%M:%S)] $v load $(cut -d' ' -f1-3 /proc/loadavg)" >&2
    $A/target/release/echo_backend --listen 127.0.0.1:19001 2>/dev/null &
    be=$!
    RUST_LOG=warn valgrind --tool=callgrind --instr-atstart=no --callgrind-out-file="$out/cg-$v.out" \
        "$bin" --config $A/bench/wsrouter.toml 2>"$out/valgrind-$v.log" &
    rt=$!
    for i in $(seq 100); do curl -fsS -o /dev/null http://127.0.0.1:19090/readyz 2>/dev/null && break; sleep 0.2; done
    # one upgrade through, then instrumentation on
    $A/target/release/loadgen throughput -c 1 --window 1 --size 64 --duration 1s --warmup 0s \
        --url ws://127.0.0.1:18080/chat >/dev/null 2>&1 || true
    callgrind_control -i on "$rt" >/dev/null
    $A/target/release/loadgen throughput -c 50 --window 16 --size 64 --duration 8s --warmup 1s \
        --url ws://127.0.0.1:18080/chat >"$out/loadgen-$v.json" 2>"$out/loadgen-$v.err"
    callgrind_control -i off "$rt" >/dev/null
    kill -TERM "$rt"; wait "$rt" || true
    kill -TERM "$be"; wait "$be" || true
    echo "[callgrind $(date +%H:%M:%S)] $v done, load $(cut -d' ' -f1-3 /proc/loadavg)" >&2
done
