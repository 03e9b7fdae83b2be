#!/usr/bin/env bash
# Ad hoc driver (not part of bench/), from sample-read-watermark-failover:
# bench/failover.sh from the AFTER worktree (c1faf7b, which has --ack) with
# its own router binary, plain and --ack (acknowledging echo backends)
# alternated, one run each per round, the order flipped every round.
#   alternate.sh ROUNDS SESSIONS OUTDIR
set -euo pipefail
rounds=$1 sessions=$2 out=$3
A=/work/wt-after/target/release/wsrouter
FO=/work/wt-after/bench/failover.sh
mkdir -p "$out"
for r in $(seq "$rounds"); do
    if [ $((r % 2)) = 1 ]; then order="plain ack"; else order="ack plain"; fi
    for v in $order; do
        extra=(); [ "$v" = ack ] && extra=(--ack)
        echo "[alternate $(date +%H:%M:%S)] round $r $v load $(cut -d' ' -f1-3 /proc/loadavg); $(head -1 /proc/pressure/cpu)" >&2
        "$FO" --no-build --wsrouter "$A" --sessions "$sessions" --runs 1 "${extra[@]}" --out "$out/r$r-$v"
        jq -c --arg v "$v" --argjson r "$r" --arg load "$(cut -d' ' -f1-3 /proc/loadavg)" \
            '{variant: $v, round: $r, load_after_run: $load} + .' "$out/r$r-$v/raw.jsonl" >>"$out/raw.jsonl"
    done
done
