#!/usr/bin/env bash
# Profile one proxy under one load:
#   perf      where the CPU goes (perf record);
#   strace    which system calls, how long each (slows the proxy a lot);
#   stat      CPU per message, with nothing attached: the exact CPU time
#             from /proc/PID/task/*/schedstat, split into user and system
#             by the kernel's 10 ms ticks (noisy: compare several runs);
#   syscalls  system calls and context switches per message, counted by
#             kernel tracepoints (perf stat; this too costs the proxy CPU).
# See BENCHMARKS.md, "Where the CPU goes now".
#
#   bench/profile.sh perf wsrouter -- throughput -c 50 --window 16 --size 64 --duration 8s
#   bench/profile.sh strace nginx -- throughput -c 50 --window 16 --size 64 --duration 5s
#   bench/profile.sh stat haproxy -- throughput -c 50 --window 16 --size 64 --duration 6s
#
# The proxy is wsrouter, nginx or haproxy, or one of the byte tunnels that
# serve as yardsticks (tokio-tunnel, mio-tunnel and uring-tunnel; built by
# compare.sh; BENCHMARKS.md, "The tokio floor").
#
# WSROUTER=path/to/wsrouter picks another router binary (one built with
# debug info, say) and WSROUTER_CONFIG=file another configuration (relative
# to bench/); PERF_CALLGRAPH=dwarf gives perf whole user-space stacks.
#
# Starts the echo backend (127.0.0.1:19001) and the proxy (127.0.0.1:18080,
# the configurations compare.sh uses), attaches the tool to the proxy's
# processes 1 s after the load starts, for 4 s (6 s for perf), then stops everything by pid. Everything after
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
case "$tool" in perf | strace | stat | syscalls) ;; *) echo "usage: bench/profile.sh perf|strace|stat|syscalls wsrouter|nginx|haproxy|tokio-tunnel|mio-tunnel|uring-tunnel -- LOADGEN ARGS" >&2; exit 64 ;; esac
case "$proxy" in wsrouter | nginx | haproxy | tokio-tunnel | mio-tunnel | uring-tunnel) ;; *) echo "proxy must be wsrouter, nginx, haproxy, tokio-tunnel, mio-tunnel or uring-tunnel" >&2; exit 64 ;; esac
needs=$tool
case "$tool" in stat) needs=python3 ;; syscalls) needs=perf ;; esac
command -v "$needs" >/dev/null || { echo "$needs is not installed (apt-get install linux-perf or strace)" >&2; exit 69; }

out="$BENCH/results/profile-$tool-$proxy"
rm -rf "$out"
mkdir -p "$out/run/tmp"
ulimit -n "$(ulimit -Hn)" || true

# "USER SYSTEM": clock ticks used so far by the given processes.
cpu_ticks() {
    local p u=0 s=0 fields
    for p in "$@"; do
        read -r -a fields <<<"$(cut -d')' -f2- "/proc/$p/stat" 2>/dev/null || true)"
        u=$((u + ${fields[11]:-0})) s=$((s + ${fields[12]:-0}))
    done
    echo "$u $s"
}

# Nanoseconds on CPU so far, summed over every thread of the given processes.
cpu_ns() {
    local p
    for p in "$@"; do cat "/proc/$p"/task/*/schedstat 2>/dev/null || true; done \
        | awk '{ t += $1 } END { printf "%.0f\n", t }'
}

pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT

"$ROOT/target/release/echo_backend" --listen 127.0.0.1:19001 2>"$out/backend.log" &
pids+=($!)
case "$proxy" in
    wsrouter)
        (cd "$BENCH" && exec "${WSROUTER:-$ROOT/target/release/wsrouter}" --config "${WSROUTER_CONFIG:-wsrouter.toml}") 2>"$out/proxy.log" &
        ;;
    tokio-tunnel | mio-tunnel)
        "$ROOT/target/release/${proxy/-/_}" --listen 127.0.0.1:18080 --backend 127.0.0.1:19001 2>"$out/proxy.log" &
        ;;
    uring-tunnel)
        "$ROOT/target/release/uring_tunnel" --listen 127.0.0.1:18080 --backend 127.0.0.1:19001 2>"$out/proxy.log" &
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
read -r -a targets <<<"$proxy_pid $(pgrep -P "$proxy_pid" | tr '\n' ' ' || true)"
attach=()
for p in "${targets[@]}"; do attach+=(-p "$p"); done
# perf takes one --pid option, a comma-separated list (a second would win).
perf_pids=$(IFS=,; echo "${targets[*]}")

"$ROOT/target/release/loadgen" "$@" --url ws://127.0.0.1:18080/chat >"$out/loadgen.json" 2>"$out/loadgen.log" &
load=$!
sleep 1
case "$tool" in
    perf)
        perf record -F 2000 --call-graph "${PERF_CALLGRAPH:-fp}" -o "$out/perf.data" --pid "$perf_pids" -- sleep 6 >/dev/null 2>&1 || true
        perf report -i "$out/perf.data" --no-children --sort dso,symbol -g none 2>/dev/null \
            | grep -v '^#' | grep '%' | head -60 >"$out/report.txt"
        ;;
    strace)
        timeout -s INT 4 strace -c -f "${attach[@]}" -o "$out/report.txt" || true
        ;;
    stat)
        # Nothing attached (a perf event on a thread makes every context
        # switch dearer): exact CPU time from the scheduler, and its
        # user/system split from the kernel's 10 ms ticks.
        cpu_before=$(cpu_ns "${targets[@]}") ticks_before=$(cpu_ticks "${targets[@]}")
        sleep 4
        cpu_after=$(cpu_ns "${targets[@]}") ticks_after=$(cpu_ticks "${targets[@]}")
        ;;
    syscalls)
        perf stat -x, -o "$out/perf-stat.csv" --pid "$perf_pids" \
            -e raw_syscalls:sys_enter,syscalls:sys_enter_sendto,syscalls:sys_enter_recvfrom \
            -e syscalls:sys_enter_epoll_wait,context-switches \
            -- sleep 4 >/dev/null 2>&1 || true
        ;;
esac
wait "$load" || true
if [ "$tool" = stat ] || [ "$tool" = syscalls ]; then
    # Per echoed message: the load generator's rate times the 4 s window.
    # Each message crosses the proxy twice.
    rate=$(grep -o '"messages_per_s":[0-9.]*' "$out/loadgen.json" | cut -d: -f2)
    python3 - "$tool" "$rate" "$out" ${cpu_before:+"$cpu_before" "$cpu_after" $ticks_before $ticks_after} \
        >"$out/report.txt" <<'PY'
import sys
tool, rate, out = sys.argv[1], float(sys.argv[2]), sys.argv[3]
messages = rate * 4
print(f"echoed messages per second (load generator): {rate:.0f}")
if tool == "stat":
    before, after, u0, s0, u1, s1 = map(int, sys.argv[4:10])
    cpu_ns = after - before
    user = (u1 - u0) / max(1, (u1 - u0) + (s1 - s0))
    print(f"proxy CPU in the 4 s: {cpu_ns / 1e9:.3f} s, {100 * user:.0f} % of it in user space")
    print(f"messages per proxy CPU-second: {messages / (cpu_ns / 1e9):.0f}")
    print(f"CPU per message: {cpu_ns / messages:.0f} ns ({user * cpu_ns / messages:.0f} user, {(1 - user) * cpu_ns / messages:.0f} system)")
else:
    for line in open(f"{out}/perf-stat.csv"):
        fields = line.strip().split(",")
        if len(fields) > 2 and fields[0].isdigit():
            print(f"{fields[2]:36s} {int(fields[0]):12d}  {int(fields[0]) / messages:8.4f} per message")
PY
fi
echo "profile: $out/report.txt"
head -25 "$out/report.txt"
