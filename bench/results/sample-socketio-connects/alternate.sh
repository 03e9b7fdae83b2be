#!/usr/bin/env bash
# Ad hoc: bench/socketio.sh --parts ws for the BEFORE and AFTER routers, one
# invocation per binary, alternated (ORDER, default "before after after before").
# Every invocation uses the AFTER tree's script, loadgen and echo_backend.
#   alternate.sh OUTDIR            -> OUTDIR/<i>-<variant>/{raw.jsonl,summary.md,versions.txt}
set -euo pipefail
out=$1
BENCH_ROOT=${BENCH_ROOT:-/tmp/bench-sio}
ORDER=${ORDER:-before after after before}
RUNS=${RUNS:-5}
mkdir -p "$out"
i=0
for v in $ORDER; do
    i=$((i + 1))
    echo "[alternate $(date -u +%H:%M:%S)] invocation $i: $v, load $(cut -d' ' -f1-3 /proc/loadavg)" >&2
    "$BENCH_ROOT/after/bench/socketio.sh" --parts ws --runs "$RUNS" --no-build \
        --wsrouter "$BENCH_ROOT/$v/target/release/wsrouter" --out "$out/$i-$v" >/dev/null
done
echo "[alternate $(date -u +%H:%M:%S)] done, load $(cut -d' ' -f1-3 /proc/loadavg)" >&2
