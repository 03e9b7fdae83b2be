#!/usr/bin/env bash
# Ad hoc driver (not part of bench/), from sample-read-watermark-cpu with the
# load average recorded: runs bench/compare.sh's throughput and latency
# workloads on two router binaries, one compare.sh invocation per binary per
# round, the order flipped every round. compare.sh, its configs, loadgen and
# echo_backend come from the AFTER worktree (compare.sh, its configs and
# loadgen are the same at both commits; echo_backend only gained --ack, not
# used here).
#   alternate.sh ROUNDS OUTDIR
set -euo pipefail
rounds=$1 out=$2
B=/work/wt-before/target/release/wsrouter
A=/work/wt-after/target/release/wsrouter
CMP=/work/wt-after/bench/compare.sh
mkdir -p "$out"
for r in $(seq "$rounds"); do
    if [ $((r % 2)) = 1 ]; then order="before after"; else order="after before"; fi
    for v in $order; do
        bin=$B; [ "$v" = after ] && bin=$A
        echo "[alternate $(date +%H:%M:%S)] round $r $v load $(cut -d' ' -f1-3 /proc/loadavg)" >&2
        "$CMP" --no-build --wsrouter "$bin" --targets wsrouter --workloads throughput,latency \
            --runs 1 --out "$out/r$r-$v"
        jq -c --arg v "$v" --argjson r "$r" --arg load "$(cut -d' ' -f1-3 /proc/loadavg)" \
            '{variant: $v, round: $r, load_after_run: $load} + .' "$out/r$r-$v/raw.jsonl" >>"$out/raw.jsonl"
    done
done
