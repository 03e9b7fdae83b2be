#!/usr/bin/env bash
# Failover benchmark (issue 4): 8,000 sessions through wsrouter on one echo
# backend, that backend SIGKILLed mid-stream, and how the sessions fare. See
# BENCHMARKS.md, "Failover".
#
#   bench/failover.sh                      # 8,000 sessions, one run (about 45 s)
#   bench/failover.sh --runs 3             # three runs, one JSON line each
#   bench/failover.sh --sessions 1000 --log-level info
#
# Per run: echo backend A (127.0.0.1:19101, region eu, echoes marked "A") and
# B (127.0.0.1:19102, region us, marked "B") and the release router with
# bench/failover.toml (public 127.0.0.1:18180, admin 127.0.0.1:19190) are
# started afresh. Loopback clients land on the default region, eu, so every
# session is on A. The load generator opens the sessions, each sends a
# numbered 64-byte message every 1/rate s from a random phase, SIGKILLs A
# --kill-after into the send phase, keeps sending until --duration, waits
# --drain for the last echoes and reports per session (loadgen failover
# mode). The router's CPU and RSS are sampled from /proc by the load
# generator. Afterwards the router's migration metrics are scraped, and one
# JSON line per run is printed on stdout (and kept in raw.jsonl).
#
# Everything started here is stopped by pid. Results:
# bench/results/failover-<date>/{raw.jsonl,versions.txt,logs/}.

set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BENCH="$ROOT/bench"

A_ADDR=127.0.0.1:19101
B_ADDR=127.0.0.1:19102
PROXY_ADDR=127.0.0.1:18180
ADMIN_ADDR=127.0.0.1:19190

sessions=8000
rate=2
kill_after=10s
duration=25s
drain=5s
runs=1
build=1
log_level=warn
config="$BENCH/failover.toml"
wsrouter=""
out=""
ack=""

usage() {
    cat <<EOF
usage: bench/failover.sh [options]

  --sessions N       sessions through the router, all on backend A (default $sessions; at most 9000)
  --rate R           messages per second per session (default $rate)
  --kill-after D     SIGKILL backend A this long into the send phase (default $kill_after)
  --duration D       send phase, kill included (default $duration)
  --drain D          wait for outstanding echoes after the send phase (default $drain)
  --runs N           repeat the whole benchmark N times (default 1)
  --log-level L      the router's RUST_LOG (default $log_level; "info" logs every move)
  --config FILE      router configuration (default bench/failover.toml)
  --wsrouter BIN     router binary (default target/release/wsrouter)
  --ack              the echo backends acknowledge each echo (X-Wsrouter-Ack; exactly once)
  --no-build         use the binaries already in target/release
  --out DIR          results folder (default bench/results/failover-<date>)
  -h, --help         this text
EOF
}

while [ $# -gt 0 ]; do
    case "$1" in
        --sessions) sessions=$2; shift 2 ;;
        --rate) rate=$2; shift 2 ;;
        --kill-after) kill_after=$2; shift 2 ;;
        --duration) duration=$2; shift 2 ;;
        --drain) drain=$2; shift 2 ;;
        --runs) runs=$2; shift 2 ;;
        --log-level) log_level=$2; shift 2 ;;
        --config) config=$2; shift 2 ;;
        --wsrouter) wsrouter=$2; shift 2 ;;
        --ack) ack=--ack; shift ;;
        --no-build) build=0; shift ;;
        --out) out=$2; shift 2 ;;
        -h|--help) usage; exit 0 ;;
        *) echo "failover.sh: unknown option $1" >&2; usage >&2; exit 64 ;;
    esac
done

die() { echo "failover.sh: $*" >&2; exit 1; }
log() { echo "[failover] $*" >&2; }
# shellcheck source=bench/lib.sh
. "$BENCH/lib.sh"

if ! [[ "$sessions" =~ ^[1-9][0-9]{0,3}$ ]] || [ "$sessions" -gt 9000 ]; then
    die "--sessions must be between 1 and 9000 (one router holds ~9,900 sessions under 20,000 open files)"
fi
[[ "$runs" =~ ^[1-9]$ ]] || die "--runs must be between 1 and 9"
[[ "$log_level" =~ ^[a-z,=_:]+$ ]] || die "--log-level: e.g. warn, info, wsrouter=debug"
[ -f "$config" ] || die "no config file $config"
config=$(realpath "$config")
for tool in jq curl; do
    command -v "$tool" >/dev/null || die "$tool is needed"
done

raise_fd_limit
release_binaries "$build" "$wsrouter"

stamp=$(date +%Y%m%d-%H%M%S)
[ -n "$out" ] || out="$BENCH/results/failover-$stamp"
mkdir -p "$out/logs"
RAW="$out/raw.jsonl"
: >"$RAW"
CLK_TCK=$(getconf CLK_TCK)
commit="$(cd "$ROOT" && git rev-parse --short HEAD 2>/dev/null || echo unknown)$(cd "$ROOT" && git diff --quiet HEAD -- src 2>/dev/null || echo ' (src modified)')"
[ -z "$wsrouter" ] || commit="$commit (router binary: $wsrouter)"
{
    echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "wsrouter: $commit"
    echo "rustc: $(rustc --version 2>/dev/null || echo unknown)"
    echo "kernel: $(uname -sr)"
    echo "cpus: $(nproc) ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ //'))"
    echo "memory: $(awk '/MemTotal/ {printf "%.1f GiB", $2/1048576}' /proc/meminfo)"
    echo "open files: $(ulimit -n); somaxconn $(cat /proc/sys/net/core/somaxconn); tcp_max_syn_backlog $(cat /proc/sys/net/ipv4/tcp_max_syn_backlog)"
    echo "sessions $sessions, rate $rate/s, kill after $kill_after, duration $duration, drain $drain, RUST_LOG=$log_level${ack:+, acknowledging backends}"
    echo "config: $config"
} >"$out/versions.txt"

a_pid=""
b_pid=""
proxy_pid=""

cleanup() {
    stop_pid "$proxy_pid"
    proxy_pid=""
    stop_pid "$a_pid"
    a_pid=""
    stop_pid "$b_pid"
    b_pid=""
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# The router's migration figures from its Prometheus metrics, as JSON.
router_metrics() {
    curl -fsS "http://$ADMIN_ADDR/metrics" 2>/dev/null | awk '
        /^wsrouter_(migrations_total|replayed_messages_total|closes_total|migration_duration_seconds)/ {
            print
        }' | jq -R -s '
        split("\n") | map(select(length > 0) | capture("^(?<k>[^ ]+) (?<v>[^ ]+)$"))
        | map({(.k): (.v | tonumber? // .v)}) | add // {}'
}

run_one() {
    local run=$1 tag="run$1"
    for addr in "$A_ADDR" "$B_ADDR" "$PROXY_ADDR" "$ADMIN_ADDR"; do
        port_free "$addr" || die "$addr is already in use; stop whatever listens there"
    done
    "$ECHO" --listen "$A_ADDR" --mark A $ack 2>"$out/logs/$tag-backend-a.log" &
    a_pid=$!
    "$ECHO" --listen "$B_ADDR" --mark B $ack 2>"$out/logs/$tag-backend-b.log" &
    b_pid=$!
    (cd "$(dirname "$config")" && RUST_LOG=$log_level exec "$WSROUTER" --config "$config") \
        2>"$out/logs/$tag-router.log" &
    proxy_pid=$!
    probe_url "ws://$PROXY_ADDR/chat" || die "the router does not relay WebSocket upgrades (see $out/logs/$tag-*.log)"
    curl -fsS -o /dev/null "http://$ADMIN_ADDR/readyz" || die "wsrouter is not ready"
    sleep 0.3
    log "run $run: $sessions sessions at $rate msg/s, backend A (pid $a_pid) killed after $kill_after"
    local rc=0
    "$LOADGEN" failover --url "ws://$PROXY_ADDR/chat" -c "$sessions" --rate "$rate" --size 64 \
        --duration "$duration" --kill-after "$kill_after" --drain "$drain" \
        --kill-pid "$a_pid" --watch-pid "$proxy_pid" --clk-tck "$CLK_TCK" \
        --label "failover-$tag" --time-limit 180s \
        >"$out/$tag-loadgen.json" 2>"$out/logs/$tag-loadgen.log" || rc=$?
    [ "$rc" = 0 ] || log "loadgen exited with $rc"
    # A was killed by the load generator: collect it.
    wait "$a_pid" 2>/dev/null || true
    a_pid=""
    local metrics backends
    metrics=$(router_metrics || echo '{}')
    backends=$(curl -fsS "http://$ADMIN_ADDR/api/backends" 2>/dev/null || echo 'null')
    if ! kill -0 "$proxy_pid" 2>/dev/null; then
        log "the router died during the run; see $out/logs/$tag-router.log"
    fi
    cleanup
    local line warnings
    line=$(tail -1 "$out/$tag-loadgen.json")
    [ -n "$line" ] || { log "no result line from loadgen ($tag)"; return 0; }
    # Router warnings and errors by message (key=value fields stripped).
    warnings=$( { sed -E 's/\x1b\[[0-9;]*m//g' "$out/logs/$tag-router.log" 2>/dev/null || true; } \
        | { grep -E ' (WARN|ERROR) ' || true; } \
        | sed -E 's/^.* (WARN|ERROR) //; s/^([a-z_]+\{[^}]*\}:)+ //; s/^[a-z_:]+: //; s/ [a-z_.]+=.*$//' \
        | sort | uniq -c | sort -rn | head -20 \
        | jq -R -s 'split("\n") | map(select(length > 0) | capture("^ *(?<n>[0-9]+) (?<m>.*)$") | {(.m): (.n | tonumber)}) | add // {}')
    echo "$line" | jq -c --argjson run "$run" --arg commit "$commit" \
        --argjson metrics "$metrics" --argjson backends "$backends" --argjson warnings "$warnings" '
        .failover as $f
        | {
            benchmark: "failover",
            run: $run,
            wsrouter: $commit,
            sessions: $f.sessions,
            sessions_on_killed_backend: ($f.first_backend.A // 0),
            relaying_again_ms: $f.recovery_ms,
            recovered: $f.recovered,
            recovered_within_2s: $f.recovered_within_2s,
            not_recovered: $f.not_recovered,
            first_echo_round_trip_ms: $f.first_echo_round_trip_ms,
            client_disconnects: $f.disconnects,
            lost_messages: $f.messages.lost,
            lost_in_connected_sessions: $f.messages.lost_in_connected_sessions,
            duplicated_messages: $f.messages.duplicated,
            reordered_messages: $f.messages.reordered,
            messages_sent: $f.messages.sent,
            router_cpu_pct_peak: $f.router.cpu_pct_peak,
            router_cpu_pct_before_kill: $f.router.cpu_pct_before_kill,
            router_cpu_s_failover: $f.router.cpu_s_failover,
            machine_busy_pct_before_kill: $f.router.machine_busy_pct_before_kill,
            machine_busy_pct_failover: $f.router.machine_busy_pct_failover,
            router_runqueue_wait_pct_failover: $f.router.runqueue_wait_pct_failover,
            router_rss_mib_before_kill: (if $f.router.rss_kib_before_kill then ($f.router.rss_kib_before_kill / 1024 * 10 | round) / 10 else null end),
            router_rss_mib_peak: (if $f.router.rss_kib_peak then ($f.router.rss_kib_peak / 1024 * 10 | round) / 10 else null end),
            router_metrics: $metrics,
            router_warnings: $warnings,
            backends_after: ($backends | if type == "array" then map({id, state, sessions}) else . end),
            loadgen: .
          }' >>"$RAW"
    tail -1 "$RAW"
}

for run in $(seq "$runs"); do
    run_one "$run"
done

log "raw results: $RAW"
jq -r '"[failover] run \(.run): relaying again p50 \(.relaying_again_ms.p50) ms, p99 \(.relaying_again_ms.p99) ms, max \(.relaying_again_ms.max) ms; \(.recovered)/\(.sessions) recovered (\(.recovered_within_2s) within 2 s); disconnects \(.client_disconnects); lost \(.lost_messages); duplicated \(.duplicated_messages); router CPU peak \(.router_cpu_pct_peak) %, RSS peak \(.router_rss_mib_peak) MiB"' "$RAW" >&2
