#!/usr/bin/env bash
# Ad hoc driver (not part of bench/), from sample-read-watermark-fix-failover:
# bench/failover.sh from the AFTER worktree (de0f219; its failover.toml,
# loadgen and echo_backend) with the BEFORE (e16eb32) and AFTER (de0f219)
# router binaries alternated, one run each per round, the order flipped every
# round (before, after, after, before for 2 rounds). Only the router changes.
#   alternate.sh ROUNDS SESSIONS OUTDIR
set -euo pipefail
rounds=$1 sessions=$2 out=$3
B=/work/wt-before/target/release/wsrouter
A=/work/wt-after/target/release/wsrouter
FO=/work/wt-after/bench/failover.sh
mkdir -p "$out"
for r in $(seq "$rounds"); do
    if [ $((r % 2)) = 1 ]; then order="before after"; else order="after before"; fi
    for v in $order; do
        bin=$B; [ "$v" = after ] && bin=$A
        load_before="$(cut -d' ' -f1-3 /proc/loadavg)"
        psi_before="$(sed -n 's/^some avg10=\([^ ]*\) avg60=\([^ ]*\).*/\2/p' /proc/pressure/cpu 2>/dev/null || true)"
        echo "[alternate $(date -u +%H:%M:%S)] round $r $v load $load_before cpu-psi-avg60 $psi_before" >&2
        "$FO" --no-build --wsrouter "$bin" --sessions "$sessions" --runs 1 --out "$out/r$r-$v"
        jq -c --arg v "$v" --argjson r "$r" --arg lb "$load_before" --arg psi "$psi_before" \
            --arg load "$(cut -d' ' -f1-3 /proc/loadavg)" \
            '{variant: $v, round: $r, load_before_run: $lb, cpu_psi_avg60_before: $psi, load_after_run: $load} + .' \
            "$out/r$r-$v/raw.jsonl" >>"$out/raw.jsonl"
    done
done
