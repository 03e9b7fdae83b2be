#!/usr/bin/env bash
# Ad hoc driver (not part of bench/): bench/failover.sh on two router
# binaries, one run per binary per round, the order flipped every round.
# failover.sh, bench/failover.toml, loadgen and echo_backend come from the
# AFTER worktree (bench/ and examples/ are identical at both commits).
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
        echo "[alternate $(date +%H:%M:%S)] round $r $v load $(cut -d' ' -f1-3 /proc/loadavg); $(head -1 /proc/pressure/cpu)" >&2
        "$FO" --no-build --wsrouter "$bin" --sessions "$sessions" --runs 1 --out "$out/r$r-$v"
        jq -c --arg v "$v" --argjson r "$r" --arg load "$(cut -d' ' -f1-3 /proc/loadavg)" \
            '{variant: $v, round: $r, load_after_run: $load} + .' "$out/r$r-$v/raw.jsonl" >>"$out/raw.jsonl"
    done
done
