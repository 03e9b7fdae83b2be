#!/usr/bin/env bash
# Profile one proxy under one load: perf (where the CPU goes) or strace
# (which system calls, how many). See BENCHMARKS.md, "Where the CPU goes now".
#
#   bench/profile.sh perf wsrouter -- throughput -c 50 --window 16 --size 64 --duration 8s
#   bench/profile.sh strace nginx -- throughput -c 50 --window 16 --size 64 --duration 5s
#
# Starts the echo backend (127.0.0.1:19001) and the proxy (127.0.0.1:18080,
# the configurations compare.sh uses), attaches the tool to the proxy's
# processes 1 s after the load starts, for 4 s (strace) or the load's
# duration minus 2 s (perf), then stops everything by pid. Everything after
# `--` goes to the load generator (its --url is added). Needs the release
# binaries (bench/compare.sh builds them) and perf or strace installed.
# Output: bench/results/profile-<tool>-<proxy>/{report.txt,loadgen.json,...}.

set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BENCH="$ROOT/bench"
tool=${1:-}
proxy=${2:-}
shift 2 || true
[ "${1:-}" = "--" ] && shift
case "$tool" in perf | strace) ;; *) echo "usage: bench/profile.sh perf|strace wsrouter|nginx|haproxy -- LOADGEN ARGS" >&2; exit 64 ;; esac
case "$proxy" in wsrouter | nginx | haproxy) ;; *) echo "proxy must be wsrouter, nginx or haproxy" >&2; exit 64 ;; esac
command -v "$tool" >/dev/null || { echo "$tool is not installed (apt-get install linux-perf or strace)" >&2; exit 69; }

out="$BENCH/results/profile-$tool-$proxy"
rm -rf "$out"
mkdir -p "$out/run/tmp"
ulimit -n "$(ulimit -Hn)" || true

pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT

"$ROOT/target/release/examples/echo_backend" --listen 127.0.0.1:19001 2>"$out/backend.log" &
pids+=($!)
case "$proxy" in
    wsrouter)
        (cd "$BENCH" && exec "$ROOT/target/release/wsrouter" --config wsrouter.toml) 2>"$out/proxy.log" &
        ;;
    nginx)
        nginx -e stderr -p "$out/run/" -c "$BENCH/nginx.conf" -g 'daemon off;' 2>"$out/proxy.log" &
        ;;
    haproxy)
        haproxy -db -f "$BENCH/haproxy.cfg" 2>"$out/proxy.log" &
        ;;
esac
proxy_pid=$!
pids+=("$proxy_pid")
sleep 1

# Every process of the proxy: the main one and its workers.
targets="$proxy_pid $(pgrep -P "$proxy_pid" | tr '\n' ' ' || true)"
attach=()
for p in $targets; do attach+=(-p "$p"); done

"$ROOT/target/release/examples/loadgen" "$@" --url ws://127.0.0.1:18080/chat >"$out/loadgen.json" 2>"$out/loadgen.log" &
load=$!
sleep 1
case "$tool" in
    perf)
        perf record -F 2000 -g -o "$out/perf.data" "${attach[@]/#-p/--pid}" -- sleep 6 >/dev/null 2>&1 || true
        perf report -i "$out/perf.data" --no-children --sort dso,symbol -g none 2>/dev/null \
            | grep -v '^#' | grep '%' | head -60 >"$out/report.txt"
        ;;
    strace)
        timeout -s INT 4 strace -c -f "${attach[@]}" -o "$out/report.txt" || true
        ;;
esac
wait "$load" || true
echo "profile: $out/report.txt"
head -25 "$out/report.txt"
