#!/usr/bin/env bash
# Compare wsrouter with HAProxy and NGINX (and the echo backend alone) on the
# same WebSocket workloads, one target at a time. See BENCHMARKS.md.
#
#   bench/compare.sh --quick                       # smoke test, ~1 minute
#   bench/compare.sh --install --runs 5            # the full comparison
#   bench/compare.sh --targets wsrouter,haproxy --workloads latency,idle
#
# Everything runs on loopback: the echo backend on 127.0.0.1:19001, the
# proxy under test on 127.0.0.1:18080 (wsrouter's admin on 127.0.0.1:19090).
# For every run of every workload the backend and the proxy are started
# afresh, so that no run inherits another's memory or connections.
#
# Per run it records the load generator's JSON line plus the proxy's CPU
# seconds (utime+stime from /proc/PID/stat, summed over the proxy's
# processes) during the workload and, for the idle workload, the proxy's RSS
# (VmRSS summed over its processes) before and with every session open.
# Results: bench/results/<date>[-quick]/{raw.jsonl,summary.md,versions.txt,logs/}.

set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BENCH="$ROOT/bench"

BACKEND_ADDR=127.0.0.1:19001
PROXY_ADDR=127.0.0.1:18080
ADMIN_ADDR=127.0.0.1:19090
ALL_TARGETS=direct,wsrouter,haproxy,nginx
# Byte tunnels on tokio, on a hand-written epoll loop (bench/src/bin/) and
# on io_uring (bench/uring_tunnel/), run only when named: BENCHMARKS.md, "The
# tokio floor".
YARDSTICKS=tokio-tunnel,mio-tunnel,uring-tunnel
ALL_WORKLOADS=latency,throughput,large,idle,churn

targets=$ALL_TARGETS
workloads=$ALL_WORKLOADS
runs=1
quick=0
install=0
build=1
out=""
loadgen_threads=1
wsrouter_bin=""

usage() {
    cat <<EOF
usage: bench/compare.sh [options]

  --targets LIST     comma-separated, from: $ALL_TARGETS (default: all),
                     tokio-tunnel, mio-tunnel, uring-tunnel (byte tunnels, yardsticks)
  --workloads LIST   comma-separated, from: $ALL_WORKLOADS (default: all)
  --runs N           repeat every workload N times; the summary quotes medians (default 1)
  --quick            tiny sizes (few connections, 2 s) for a smoke test
  --install          apt-get install haproxy, nginx and jq first (needs root)
  --no-build         use the binaries already in target/release
  --wsrouter BIN     router binary to test (default target/release/wsrouter)
  --out DIR          results folder (default bench/results/<date>[-quick])
  --loadgen-threads N  worker threads of the load generator (default 1)
  -h, --help         this text
EOF
}

while [ $# -gt 0 ]; do
    case "$1" in
        --targets) targets=$2; shift 2 ;;
        --workloads) workloads=$2; shift 2 ;;
        --runs) runs=$2; shift 2 ;;
        --quick) quick=1; shift ;;
        --install) install=1; shift ;;
        --no-build) build=0; shift ;;
        --wsrouter) wsrouter_bin=$2; shift 2 ;;
        --out) out=$2; shift 2 ;;
        --loadgen-threads) loadgen_threads=$2; shift 2 ;;
        -h|--help) usage; exit 0 ;;
        *) echo "compare.sh: unknown option $1" >&2; usage >&2; exit 64 ;;
    esac
done

die() { echo "compare.sh: $*" >&2; exit 1; }
log() { echo "[compare] $*" >&2; }
# shellcheck source=bench/lib.sh
. "$BENCH/lib.sh"

[[ "$runs" =~ ^[1-9][0-9]?$ ]] || die "--runs must be between 1 and 99"
[[ "$loadgen_threads" =~ ^[1-9]$ ]] || die "--loadgen-threads must be between 1 and 9"
IFS=, read -r -a target_list <<<"$targets"
IFS=, read -r -a workload_list <<<"$workloads"
for t in "${target_list[@]}"; do
    [[ ",$ALL_TARGETS,$YARDSTICKS," == *",$t,"* ]] || die "unknown target $t (choose from $ALL_TARGETS,$YARDSTICKS)"
done
for w in "${workload_list[@]}"; do
    [[ ",$ALL_WORKLOADS," == *",$w,"* ]] || die "unknown workload $w (choose from $ALL_WORKLOADS)"
done

# --- tools -----------------------------------------------------------------

if [ "$install" = 1 ]; then
    [ "$(id -u)" = 0 ] || die "--install needs root (apt-get)"
    log "installing haproxy, nginx and jq from Debian packages"
    # Keep the packages' services from starting on install: this script runs
    # them itself, in the foreground, on its own ports.
    policy_created=0
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
        chmod +x /usr/sbin/policy-rc.d
        policy_created=1
    fi
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq haproxy nginx jq >/dev/null
    if [ "$policy_created" = 1 ]; then
        rm -f /usr/sbin/policy-rc.d
    fi
fi
command -v jq >/dev/null || die "jq is needed (run with --install, or apt-get install jq)"
command -v curl >/dev/null || die "curl is needed"
for t in "${target_list[@]}"; do
    case "$t" in
        haproxy) command -v haproxy >/dev/null || die "haproxy not installed (run with --install)" ;;
        nginx) command -v nginx >/dev/null || die "nginx not installed (run with --install)" ;;
    esac
done

# One router holds ~9,900 sessions under a hard limit of 20,000 open files.
raise_fd_limit
release_binaries "$build" "$wsrouter_bin"
if [[ ",$targets," == *",uring-tunnel,"* ]]; then
    if [ "$build" = 1 ]; then
        log "building the io_uring tunnel (its own package), niced"
        (cd "$ROOT" && nice -n 10 cargo build --release --manifest-path bench/uring_tunnel/Cargo.toml --target-dir target)
    fi
    [ -x "$ROOT/target/release/uring_tunnel" ] || die "target/release/uring_tunnel is missing (run without --no-build)"
fi

# --- output ----------------------------------------------------------------

stamp=$(date +%Y%m%d-%H%M%S)
[ -n "$out" ] || out="$BENCH/results/$stamp$([ "$quick" = 1 ] && echo -quick)"
mkdir -p "$out/logs" "$out/run"
RAW="$out/raw.jsonl"
: >"$RAW"
CLK_TCK=$(getconf CLK_TCK)

{
    echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "mode: $([ "$quick" = 1 ] && echo 'quick (smoke test sizes)' || echo full)"
    echo "runs: $runs"
    echo "wsrouter: $(cd "$ROOT" && git rev-parse --short HEAD 2>/dev/null || echo unknown)$(cd "$ROOT" && git diff --quiet HEAD -- src 2>/dev/null || echo ' (src modified)')$([ -z "$wsrouter_bin" ] || echo " (router binary: $wsrouter_bin)")"
    echo "rustc: $(rustc --version 2>/dev/null || echo unknown)"
    command -v haproxy >/dev/null && echo "haproxy: $(haproxy -v 2>/dev/null | head -1)"
    command -v nginx >/dev/null && echo "nginx: $(nginx -v 2>&1 | head -1)"
    echo "kernel: $(uname -sr)"
    echo "cpus: $(nproc) ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ //'))"
    echo "memory: $(awk '/MemTotal/ {printf "%.1f GiB", $2/1048576}' /proc/meminfo)"
    echo "loadgen threads: $loadgen_threads; echo backend threads: 1"
    # Other work on the machine skews every figure: note how busy it was.
    echo "load at start: $(cut -d' ' -f1-3 /proc/loadavg); cpu pressure: $(head -1 /proc/pressure/cpu 2>/dev/null || echo n/a)"
} >"$out/versions.txt"

# --- workloads -------------------------------------------------------------

# Load generator arguments per workload (full sizes from issue 3; --quick shrinks them).
workload_args() {
    local w=$1
    if [ "$quick" = 1 ]; then
        case "$w" in
            latency) echo "latency -c 10 --rate 100 --size 64 --duration 2s --warmup 500ms" ;;
            throughput) echo "throughput -c 5 --window 16 --size 64 --duration 2s --warmup 500ms" ;;
            large) echo "throughput -c 2 --window 4 --size 65536 --duration 2s --warmup 500ms" ;;
            idle) echo "idle -c 200 --duration 2s" ;;
            churn) echo "churn --cycles 300 --concurrency 20" ;;
        esac
    else
        case "$w" in
            latency) echo "latency -c 100 --rate 100 --size 64 --duration 10s --warmup 1s" ;;
            throughput) echo "throughput -c 50 --window 16 --size 64 --duration 10s --warmup 1s" ;;
            large) echo "throughput -c 10 --window 4 --size 65536 --duration 10s --warmup 1s" ;;
            idle) echo "idle -c 8000 --duration 10s" ;;
            churn) echo "churn --cycles 5000 --concurrency 100" ;;
        esac
    fi
}

# --- processes -------------------------------------------------------------

backend_pid=""
proxy_pid=""


# VmRSS in KiB, summed over a process tree.
rss_kib() {
    local total=0 pid kib
    [ -n "$1" ] || { echo 0; return; }
    for pid in $(tree "$1"); do
        kib=$(awk '/^VmRSS:/ {print $2}' "/proc/$pid/status" 2>/dev/null) || continue
        total=$((total + ${kib:-0}))
    done
    echo "$total"
}

cleanup() {
    stop_pid "$proxy_pid"
    proxy_pid=""
    stop_pid "$backend_pid"
    backend_pid=""
}
trap cleanup EXIT
trap 'exit 130' INT TERM

start_target() {
    local target=$1 tag=$2
    for addr in "$BACKEND_ADDR" "$PROXY_ADDR"; do
        port_free "$addr" || die "$addr is already in use; stop whatever listens there"
    done
    "$ECHO" --listen "$BACKEND_ADDR" 2>"$out/logs/$tag-backend.log" &
    backend_pid=$!
    case "$target" in
        direct) proxy_pid="" ;;
        wsrouter)
            RUST_LOG=warn "$WSROUTER" --config "$BENCH/wsrouter.toml" 2>"$out/logs/$tag-proxy.log" &
            proxy_pid=$!
            ;;
        tokio-tunnel | mio-tunnel)
            "$ROOT/target/release/${target/-/_}" --listen "$PROXY_ADDR" --backend "$BACKEND_ADDR" 2>"$out/logs/$tag-proxy.log" &
            proxy_pid=$!
            ;;
        uring-tunnel)
            "$ROOT/target/release/uring_tunnel" --listen "$PROXY_ADDR" --backend "$BACKEND_ADDR" 2>"$out/logs/$tag-proxy.log" &
            proxy_pid=$!
            ;;
        haproxy)
            haproxy -db -f "$BENCH/haproxy.cfg" 2>"$out/logs/$tag-proxy.log" &
            proxy_pid=$!
            ;;
        nginx)
            local prefix="$out/run/nginx"
            mkdir -p "$prefix/tmp"
            nginx -e stderr -p "$prefix/" -c "$BENCH/nginx.conf" -g 'daemon off;' \
                2>"$out/logs/$tag-proxy.log" &
            proxy_pid=$!
            ;;
    esac
    local url
    url=$(target_url "$target")
    probe_url "$url" || die "$target does not relay WebSocket upgrades (see $out/logs/$tag-*.log)"
    if [ "$target" = wsrouter ]; then
        curl -fsS -o /dev/null "http://$ADMIN_ADDR/readyz" || die "wsrouter is not ready"
    fi
}

target_url() {
    case "$1" in
        direct) echo "ws://$BACKEND_ADDR/chat" ;;
        *) echo "ws://$PROXY_ADDR/chat" ;;
    esac
}

# --- one run ---------------------------------------------------------------

run_one() {
    local target=$1 workload=$2 run=$3
    local tag="$target-$workload-$run"
    local url args line time_limit ready rss_before=0 rss_loaded=0 backend_rss_loaded=0 sessions=0
    url=$(target_url "$target")
    # shellcheck disable=SC2207
    args=($(workload_args "$workload"))
    time_limit=$([ "$quick" = 1 ] && echo 60s || echo 180s)
    log "$target / $workload / run $run: loadgen ${args[*]}"
    start_target "$target" "$tag"
    sleep 0.3
    local backend_rss_before
    backend_rss_before=$(rss_kib "$backend_pid")
    rss_before=$(rss_kib "$proxy_pid")
    local cpu0 bcpu0 cpu1 bcpu1
    cpu0=$(cpu_ticks "$proxy_pid")
    bcpu0=$(cpu_ticks "$backend_pid")
    ready="$out/run/$tag.ready"
    rm -f "$ready"
    "$LOADGEN" "${args[@]}" --url "$url" --label "$target" --threads "$loadgen_threads" \
        --time-limit "$time_limit" --ready-file "$ready" \
        >"$out/run/$tag.json" 2>"$out/logs/$tag-loadgen.log" &
    local lg=$!
    if [ "$workload" = idle ]; then
        # Sample memory once every session is open and has settled.
        while kill -0 "$lg" 2>/dev/null && [ ! -s "$ready" ]; do sleep 0.1; done
        if [ -s "$ready" ]; then
            sleep 1
            sessions=$(head -1 "$ready")
            rss_loaded=$(rss_kib "$proxy_pid")
            backend_rss_loaded=$(rss_kib "$backend_pid")
        fi
    fi
    wait "$lg" || log "loadgen exited with $? ($target / $workload / run $run)"
    cpu1=$(cpu_ticks "$proxy_pid")
    bcpu1=$(cpu_ticks "$backend_pid")
    if [ -n "$proxy_pid" ] && ! kill -0 "$proxy_pid" 2>/dev/null; then
        log "the proxy died during the run; see $out/logs/$tag-proxy.log"
    fi
    cleanup
    line=$(tail -1 "$out/run/$tag.json")
    [ -n "$line" ] || { log "no result line from loadgen ($tag)"; return 0; }
    echo "$line" | jq -c \
        --arg target "$target" --arg workload "$workload" --argjson run "$run" \
        --argjson has_proxy "$([ "$target" = direct ] && echo false || echo true)" \
        --argjson cpu "$(( cpu1 - cpu0 ))" --argjson bcpu "$(( bcpu1 - bcpu0 ))" \
        --argjson tck "$CLK_TCK" \
        --argjson rss0 "$rss_before" --argjson rss1 "$rss_loaded" \
        --argjson brss0 "$backend_rss_before" --argjson brss1 "$backend_rss_loaded" \
        --argjson sessions "${sessions:-0}" '
        {target: $target, workload: $workload, run: $run}
        + {proxy_cpu_s: (if $has_proxy then $cpu / $tck else null end),
           backend_cpu_s: ($bcpu / $tck)}
        + (if $workload == "idle" then {
              idle_sessions: $sessions,
              proxy_rss_kib_before: (if $has_proxy then $rss0 else null end),
              proxy_rss_kib_loaded: (if $has_proxy then $rss1 else null end),
              proxy_rss_kib_per_session: (if $has_proxy and $sessions > 0
                  then (($rss1 - $rss0) / $sessions * 100 | round) / 100 else null end),
              backend_rss_kib_per_session: (if $sessions > 0
                  then (($brss1 - $brss0) / $sessions * 100 | round) / 100 else null end)}
           else {} end)
        + {result: .}' >>"$RAW"
}

# --- main loop: targets one at a time ----------------------------------------

for target in "${target_list[@]}"; do
    for workload in "${workload_list[@]}"; do
        for run in $(seq "$runs"); do
            run_one "$target" "$workload" "$run"
        done
    done
done

echo "load at end: $(cut -d' ' -f1-3 /proc/loadavg); cpu pressure: $(head -1 /proc/pressure/cpu 2>/dev/null || echo n/a)" >>"$out/versions.txt"

# --- summary ---------------------------------------------------------------

summarize() {
    jq -r -s --arg targets "$targets" '
    def median: map(select(. != null)) | sort
        | if length == 0 then null
          elif length % 2 == 1 then .[(length - 1) / 2]
          else (.[length / 2 - 1] + .[length / 2]) / 2 end;
    def r(n): if . == null then null else (. * pow(10; n) | round) / pow(10; n) end;
    def cell: if . == null then "–" else tostring end;
    def ms: if . == null then null else . / 1000 end;
    # One figure of one run (input: a raw.jsonl line).
    def value($k):
        if $k == "relayed_per_cpu" then
            (if (.proxy_cpu_s // 0) > 0 then 2 * .result.messages.received / .proxy_cpu_s else null end)
        elif $k == "round_trips" then .result.rates.messages_per_s
        elif $k == "mib_per_cpu" then
            (if (.proxy_cpu_s // 0) > 0 then 2 * .result.messages.received_bytes / 1048576 / .proxy_cpu_s else null end)
        elif $k == "mib_s" then .result.rates.mib_per_s
        elif $k == "p50" then .result.latency_us.p50 | ms
        elif $k == "p99" then .result.latency_us.p99 | ms
        elif $k == "p999" then .result.latency_us.p99_9 | ms
        elif $k == "cpu" then .proxy_cpu_s
        elif $k == "rss_session" then .proxy_rss_kib_per_session
        elif $k == "rss_total" then (if .proxy_rss_kib_loaded then .proxy_rss_kib_loaded / 1024 else null end)
        elif $k == "upgrades" then .result.rates.upgrades_per_s
        elif $k == "cpu_per_upgrade" then
            (if .proxy_cpu_s != null and (.result.cycles_completed // 0) > 0
             then 1000 * .proxy_cpu_s / .result.cycles_completed else null end)
        else null end;
    [
      ["64 B messages relayed per proxy CPU-second (throughput)", "throughput", "relayed_per_cpu", 0, true],
      ["round trips per second, 64 B (throughput)", "throughput", "round_trips", 0, true],
      ["MiB relayed per proxy CPU-second, 64 KiB messages (large)", "large", "mib_per_cpu", 1, true],
      ["MiB/s echoed, 64 KiB messages (large)", "large", "mib_s", 1, true],
      ["p50 round trip, ms (latency)", "latency", "p50", 3, false],
      ["p99 round trip, ms (latency)", "latency", "p99", 3, false],
      ["p99.9 round trip, ms (latency)", "latency", "p999", 3, false],
      ["proxy CPU seconds (latency)", "latency", "cpu", 2, false],
      ["RSS per idle proxied session, KiB (idle)", "idle", "rss_session", 2, false],
      ["proxy RSS with every idle session open, MiB (idle)", "idle", "rss_total", 1, false],
      ["upgrades per second (churn)", "churn", "upgrades", 0, true],
      ["proxy CPU ms per upgrade (churn)", "churn", "cpu_per_upgrade", 3, false]
    ] as $figures
    | . as $rows
    | ($targets | split(",")) as $ts
    | (($ts | index("wsrouter")) != null and ($ts | index("haproxy")) != null) as $ratio
    | ($rows | map(.workload) | unique) as $ran
    | "| figure | " + ($ts | join(" | ")) + (if $ratio then " | wsrouter / HAProxy" else "" end) + " |",
      "| --- | " + ($ts | map("---:") | join(" | ")) + (if $ratio then " | ---:" else "" end) + " |",
      ( $figures[] as [$name, $w, $k, $d, $more]
        | select($ran | index($w))
        | [ $ts[] as $t | [ $rows[] | select(.target == $t and .workload == $w) | value($k) ] | median | r($d) ] as $vals
        | (if $ratio then
              $vals[$ts | index("wsrouter")] as $wv | $vals[$ts | index("haproxy")] as $hv
              | if $wv != null and $hv != null and $hv != 0
                then " | " + (($wv / $hv) | r(2) | tostring) + (if $more then " (higher is better)" else " (lower is better)" end)
                else " | –" end
           else "" end) as $rcell
        | "| " + $name + " | " + ($vals | map(cell) | join(" | ")) + $rcell + " |" ),
      ( [ $ts[] as $t | [ $rows[] | select(.target == $t) | .result.error_total ] | add ] as $errs
        | "| load generator errors, all runs | " + ($errs | map(cell) | join(" | ")) + (if $ratio then " | " else "" end) + " |" )
    ' "$RAW"
}

{
    echo "# Benchmark results $([ "$quick" = 1 ] && echo '(QUICK SMOKE TEST: tiny sizes, not real figures)')"
    echo
    echo '```'
    cat "$out/versions.txt"
    echo '```'
    echo
    echo "Medians over $runs run(s) per workload; every run started the backend and proxy afresh."
    echo "Relayed messages and bytes count both directions (an echo round trip is two relayed messages)."
    echo "\"–\": not applicable (the direct target has no proxy) or not run."
    echo
    summarize
    echo
    echo "Errors by kind (all runs):"
    echo
    jq -r -s '[.[] | {t: .target, w: .workload, e: .result.errors}
        | select(.e != {}) | "- \(.t) / \(.w): \(.e | to_entries | map("\(.key): \(.value)") | join(", "))"]
        | if length == 0 then "- none" else .[] end' "$RAW"
} >"$out/summary.md"

cat "$out/summary.md"
log "raw results: $RAW"
log "summary: $out/summary.md"
