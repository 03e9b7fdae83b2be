#!/usr/bin/env bash
# Ad hoc driver (not part of bench/), from sample-read-watermark-250ms-cpu/alternate.sh:
# one bench/compare.sh invocation per router binary per round, the order flipped
# every round (odd rounds before then after, even rounds after then before).
# Latency workload in every round; throughput workload in rounds 1..TPUT_ROUNDS.
# compare.sh, its config (bench/wsrouter.toml: no watermark setting, so the
# binary's default interval applies), loadgen and echo_backend come from the
# AFTER worktree (de0f219: compare.sh runs target/release/{loadgen,echo_backend}
# of that worktree, built by `cargo build --release -p wsrouter-bench --bins`);
# only the router binary changes. BEFORE_BIN overrides the BEFORE router
# (the supplementary b99c04a run); --no-build keeps compare.sh from building.
#   [BEFORE_BIN=...] alternate.sh LAT_ROUNDS TPUT_ROUNDS OUTDIR
set -euo pipefail
lat_rounds=$1 tput_rounds=$2 out=$3
B=${BEFORE_BIN:-/work/wt-before/target/release/wsrouter}
A=/work/wt-after/target/release/wsrouter
CMP=/work/wt-after/bench/compare.sh
mkdir -p "$out"
rounds=$(( lat_rounds > tput_rounds ? lat_rounds : tput_rounds ))
for r in $(seq "$rounds"); do
    if [ $((r % 2)) = 1 ]; then order="before after"; else order="after before"; fi
    w=""
    [ "$r" -le "$tput_rounds" ] && w="throughput"
    [ "$r" -le "$lat_rounds" ] && w="${w:+$w,}latency"
    for v in $order; do
        bin=$B; [ "$v" = after ] && bin=$A
        load_before="$(cut -d' ' -f1-3 /proc/loadavg)"
        psi_before="$(sed -n 's/^some avg10=\([^ ]*\) avg60=\([^ ]*\).*/\2/p' /proc/pressure/cpu 2>/dev/null || true)"
        echo "[alternate $(date -u +%H:%M:%S)] round $r $v ($w) load $load_before cpu-psi-avg60 $psi_before" >&2
        "$CMP" --no-build --wsrouter "$bin" --targets wsrouter --workloads "$w" \
            --runs 1 --out "$out/r$r-$v"
        jq -c --arg v "$v" --argjson r "$r" --arg lb "$load_before" --arg psi "$psi_before" \
            --arg load "$(cut -d' ' -f1-3 /proc/loadavg)" \
            '{variant: $v, round: $r, load_before_run: $lb, cpu_psi_avg60_before: $psi, load_after_run: $load} + .' \
            "$out/r$r-$v/raw.jsonl" >>"$out/raw.jsonl"
    done
done
