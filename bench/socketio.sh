#!/usr/bin/env bash
# The Socket.IO benchmark (issue 15; BENCHMARKS.md, "Socket.IO (issue 15)").
# Two parts, each a same-round comparison, the order flipped every round:
#
#   ws    64 B messages per router CPU-second on the Socket.IO path against
#         the plain WebSocket path of one router (bench/socketio.toml):
#         loadgen throughput -c 50 --window 16 --size 64 --duration 10s
#         --warmup 1s, to ws://127.0.0.1:18080/chat and to
#         ws://127.0.0.1:18080/socket.io/?EIO=4&transport=websocket,
#         behind them the WebSocket echo backend.
#   poll  engine.io long-poll requests per proxy CPU-second, wsrouter
#         (bench/socketio.toml) against HAProxy in HTTP mode
#         (bench/haproxy-socketio.cfg), behind them `echo_backend --http`:
#         wrk -t 1 -c 50 -d 10s -s bench/socketio-poll.lua, keep-alive GETs
#         of /socket.io/?EIO=4&transport=polling&session=kNN&sid=... (50 keys
#         in turn), after a 1 s warm-up run of the same.
#
#   bench/socketio.sh --install --runs 5        # both parts, 5 rounds
#   bench/socketio.sh --quick                    # smoke test: 2 s runs, 1 round
#   bench/socketio.sh --parts poll --runs 3 --no-build
#
# Everything runs on loopback: backend 127.0.0.1:19001, the proxy under test
# on 127.0.0.1:18080 (wsrouter's admin on 127.0.0.1:19090). Every run starts
# the backend and the proxy afresh. Per run it records the load generator's
# JSON line plus the proxy's CPU seconds (utime+stime from /proc/PID/stat,
# summed over the proxy's processes) during the measured load only, the
# backend's, and the machine's load just before.
# Results: bench/results/<date>-socketio/{raw.jsonl,summary.md,versions.txt,logs/}.

set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BENCH="$ROOT/bench"

BACKEND_ADDR=127.0.0.1:19001
PROXY_ADDR=127.0.0.1:18080
ADMIN_ADDR=127.0.0.1:19090
ALL_PARTS=ws,poll
CONFIG="$BENCH/socketio.toml"
HAPROXY_CFG="$BENCH/haproxy-socketio.cfg"
POLL_LUA="$BENCH/socketio-poll.lua"
WS_PATH_PLAIN=/chat
WS_PATH_SIO='/socket.io/?EIO=4&transport=websocket'
POLL_PATH='/socket.io/?EIO=4&transport=polling&session=k01&sid=benchSid000000000001'

parts=$ALL_PARTS
runs=5
quick=0
install=0
build=1
out=""
wsrouter_bin=""
connections=50
poll_keys=50

usage() {
    cat <<EOF
usage: bench/socketio.sh [options]

  --parts LIST       comma-separated, from: $ALL_PARTS (default: both)
  --runs N           rounds; every round runs each variant of each part once,
                     in the other order than the round before (default 5)
  --quick            2 s runs, 5 WebSocket connections, 1 round: a smoke test
  --install          apt-get install haproxy, wrk and jq first (needs root)
  --no-build         use the binaries already in target/release
  --wsrouter BIN     router binary to test (default target/release/wsrouter)
  --out DIR          results folder (default bench/results/<date>-socketio[-quick])
  --connections N    long-polling connections (default 50)
  --keys N           session keys the long-polls rotate through (default 50)
  -h, --help         this text
EOF
}

while [ $# -gt 0 ]; do
    case "$1" in
        --parts) parts=$2; shift 2 ;;
        --runs) runs=$2; shift 2 ;;
        --quick) quick=1; runs=1; shift ;;
        --install) install=1; shift ;;
        --no-build) build=0; shift ;;
        --wsrouter) wsrouter_bin=$2; shift 2 ;;
        --out) out=$2; shift 2 ;;
        --connections) connections=$2; shift 2 ;;
        --keys) poll_keys=$2; shift 2 ;;
        -h|--help) usage; exit 0 ;;
        *) echo "socketio.sh: unknown option $1" >&2; usage >&2; exit 64 ;;
    esac
done

die() { echo "socketio.sh: $*" >&2; exit 1; }
log() { echo "[socketio] $*" >&2; }
# shellcheck source=bench/lib.sh
. "$BENCH/lib.sh"

[[ "$runs" =~ ^[1-9][0-9]?$ ]] || die "--runs must be between 1 and 99"
[[ "$connections" =~ ^[1-9][0-9]{0,3}$ ]] || die "--connections must be between 1 and 9999"
[[ "$poll_keys" =~ ^[1-9][0-9]?$ ]] || die "--keys must be between 1 and 99"
IFS=, read -r -a part_list <<<"$parts"
for p in "${part_list[@]}"; do
    [[ ",$ALL_PARTS," == *",$p,"* ]] || die "unknown part $p (choose from $ALL_PARTS)"
done

# --- tools -----------------------------------------------------------------

if [ "$install" = 1 ]; then
    [ "$(id -u)" = 0 ] || die "--install needs root (apt-get)"
    log "installing haproxy, wrk and jq from Debian packages"
    # Keep HAProxy's service from starting on install: this script runs it
    # itself, in the foreground, on its own port.
    policy_created=0
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
        chmod +x /usr/sbin/policy-rc.d
        policy_created=1
    fi
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq haproxy wrk jq >/dev/null
    if [ "$policy_created" = 1 ]; then
        rm -f /usr/sbin/policy-rc.d
    fi
fi
for tool in jq curl python3; do
    command -v "$tool" >/dev/null || die "$tool is needed"
done
if [[ ",$parts," == *",poll,"* ]]; then
    command -v haproxy >/dev/null || die "haproxy not installed (run with --install)"
    command -v wrk >/dev/null || die "wrk not installed (run with --install)"
fi

raise_fd_limit
release_binaries "$build" "$wsrouter_bin"
"$WSROUTER" --check-config "$CONFIG" >/dev/null || die "$WSROUTER does not accept $CONFIG"
if [[ ",$parts," == *",poll,"* ]]; then
    haproxy -c -q -f "$HAPROXY_CFG" || die "haproxy does not accept $HAPROXY_CFG"
fi

# --- output ----------------------------------------------------------------

stamp=$(date +%Y%m%d-%H%M%S)
[ -n "$out" ] || out="$BENCH/results/$stamp-socketio$([ "$quick" = 1 ] && echo -quick)"
mkdir -p "$out/logs" "$out/run"
RAW="$out/raw.jsonl"
: >"$RAW"
CLK_TCK=$(getconf CLK_TCK)

if [ "$quick" = 1 ]; then
    ws_args=(throughput -c 5 --window 16 --size 64 --duration 2s --warmup 500ms)
    poll_seconds=2
else
    ws_args=(throughput -c 50 --window 16 --size 64 --duration 10s --warmup 1s)
    poll_seconds=10
fi
poll_args=(-t 1 -c "$connections" -d "${poll_seconds}s" --timeout 5s -s "$POLL_LUA")

{
    echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "mode: $([ "$quick" = 1 ] && echo 'quick (smoke test sizes)' || echo full)"
    echo "rounds: $runs; parts: $parts"
    echo "wsrouter: $(cd "$ROOT" && git rev-parse --short HEAD 2>/dev/null || echo unknown)$(cd "$ROOT" && git diff --quiet HEAD -- src 2>/dev/null || echo ' (src modified)')$([ -z "$wsrouter_bin" ] || echo " (router binary: $wsrouter_bin)")"
    echo "rustc: $(rustc --version 2>/dev/null || echo unknown)"
    command -v haproxy >/dev/null && echo "haproxy: $(haproxy -v 2>/dev/null | head -1)"
    command -v wrk >/dev/null && echo "wrk: $(wrk -v 2>&1 | head -1)"
    echo "kernel: $(uname -sr)"
    echo "cpus: $(nproc) ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ //'))"
    echo "memory: $(awk '/MemTotal/ {printf "%.1f GiB", $2/1048576}' /proc/meminfo)"
    echo "ws part: loadgen ${ws_args[*]} --url ws://$PROXY_ADDR$WS_PATH_PLAIN | ws://$PROXY_ADDR$WS_PATH_SIO"
    echo "poll part: POLL_KEYS=$poll_keys wrk ${poll_args[*]} http://$PROXY_ADDR/ (paths from the script: /socket.io/?EIO=4&transport=polling&session=kNN&sid=...; 1 s warm-up run first)"
    echo "load at start: $(cut -d' ' -f1-3 /proc/loadavg); cpu pressure: $(head -1 /proc/pressure/cpu 2>/dev/null || echo n/a)"
} >"$out/versions.txt"

# --- processes -------------------------------------------------------------

backend_pid=""
proxy_pid=""


cleanup() {
    stop_pid "$proxy_pid"
    proxy_pid=""
    stop_pid "$backend_pid"
    backend_pid=""
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# Start the backend (WebSocket echo, or HTTP with "http") and the proxy
# (wsrouter or haproxy), and wait until the proxy relays.
start_pair() {
    local backend_kind=$1 proxy=$2 tag=$3 addr
    for addr in "$BACKEND_ADDR" "$PROXY_ADDR"; do
        port_free "$addr" || die "$addr is already in use; stop whatever listens there"
    done
    if [ "$backend_kind" = http ]; then
        "$ECHO" --http --listen "$BACKEND_ADDR" 2>"$out/logs/$tag-backend.log" &
    else
        "$ECHO" --listen "$BACKEND_ADDR" 2>"$out/logs/$tag-backend.log" &
    fi
    backend_pid=$!
    case "$proxy" in
        wsrouter)
            RUST_LOG=warn "$WSROUTER" --config "$CONFIG" 2>"$out/logs/$tag-proxy.log" &
            proxy_pid=$!
            ;;
        haproxy)
            haproxy -db -f "$HAPROXY_CFG" 2>"$out/logs/$tag-proxy.log" &
            proxy_pid=$!
            ;;
    esac
    local _
    if [ "$backend_kind" = http ]; then
        for _ in $(seq 100); do
            if [ "$(curl -s --max-time 2 "http://$PROXY_ADDR$POLL_PATH" 2>/dev/null)" = '42["message","0123456789abcdef"]' ]; then
                break
            fi
            sleep 0.1
        done
        [ "$(curl -s --max-time 2 "http://$PROXY_ADDR$POLL_PATH")" = '42["message","0123456789abcdef"]' ] \
            || die "$proxy does not proxy long-polling requests (see $out/logs/$tag-*.log)"
    else
        probe_url "ws://$PROXY_ADDR$WS_PATH_PLAIN" || die "$proxy does not relay /chat (see $out/logs/$tag-*.log)"
        probe_url "ws://$PROXY_ADDR$WS_PATH_SIO" || die "$proxy does not relay /socket.io/ (see $out/logs/$tag-*.log)"
    fi
    if [ "$proxy" = wsrouter ]; then
        curl -fsS -o /dev/null "http://$ADMIN_ADDR/readyz" || die "wsrouter is not ready"
    fi
}

# The machine's load just before a run: 1-minute load average, CPU pressure
# (some avg10) and the number of cargo/rustc processes of anyone.
machine_load() {
    local load psi builds
    load=$(cut -d' ' -f1 /proc/loadavg)
    psi=$(sed -n 's/^some avg10=\([0-9.]*\).*/\1/p' /proc/pressure/cpu 2>/dev/null || true)
    builds=$(pgrep -c -x 'cargo|rustc|clippy-driver|rustfmt' 2>/dev/null || true)
    jq -n -c --arg load "$load" --arg psi "${psi:-}" --arg builds "${builds:-0}" \
        '{load1: ($load | tonumber), cpu_some_avg10: (if $psi == "" then null else ($psi | tonumber) end),
          builds: ($builds | tonumber)}'
}

# The long-polling requests wsrouter answered, from its metrics.
polled_ok() {
    curl -fsS --max-time 2 "http://$ADMIN_ADDR/metrics" 2>/dev/null \
        | awk '/^wsrouter_polling_requests_total\{result="ok"\}/ {print $2; found=1} END {if (!found) print 0}'
}

# --- one run ---------------------------------------------------------------

# run_one PART VARIANT ROUND POSITION
run_one() {
    local part=$1 variant=$2 round=$3 position=$4
    local tag="r$round-$part-$variant" proxy backend_kind load cpu0 cpu1 bcpu0 bcpu1 line
    local polled0=0 polled1=0 rc=0
    case "$part" in
        ws) proxy=wsrouter; backend_kind=ws ;;
        poll) proxy=$variant; backend_kind=http ;;
    esac
    start_pair "$backend_kind" "$proxy" "$tag"
    sleep 0.3
    if [ "$part" = poll ]; then
        # Warm-up: the same load for 1 s, not measured.
        POLL_KEYS=$poll_keys timeout 30 wrk -t 1 -c "$connections" -d 1s --timeout 5s -s "$POLL_LUA" \
            "http://$PROXY_ADDR/" >/dev/null 2>&1 || log "warm-up wrk exited with $? ($tag)"
        sleep 0.2
    fi
    load=$(machine_load)
    log "round $round: $part / $variant (load $(echo "$load" | jq -r .load1))"
    [ "$proxy" = wsrouter ] && [ "$part" = poll ] && polled0=$(polled_ok)
    cpu0=$(cpu_ticks "$proxy_pid")
    bcpu0=$(cpu_ticks "$backend_pid")
    if [ "$part" = ws ]; then
        local path=$WS_PATH_PLAIN
        [ "$variant" = socketio ] && path=$WS_PATH_SIO
        "$LOADGEN" "${ws_args[@]}" --url "ws://$PROXY_ADDR$path" --label "$variant" \
            --time-limit 60s >"$out/run/$tag.out" 2>"$out/logs/$tag-loadgen.log" || rc=$?
    else
        POLL_KEYS=$poll_keys timeout 60 wrk "${poll_args[@]}" "http://$PROXY_ADDR/" \
            >"$out/run/$tag.out" 2>"$out/logs/$tag-wrk.log" || rc=$?
    fi
    cpu1=$(cpu_ticks "$proxy_pid")
    bcpu1=$(cpu_ticks "$backend_pid")
    [ "$rc" = 0 ] || log "load generator exited with $rc ($tag)"
    [ "$proxy" = wsrouter ] && [ "$part" = poll ] && polled1=$(polled_ok)
    kill -0 "$proxy_pid" 2>/dev/null || log "the proxy died during the run; see $out/logs/$tag-proxy.log"
    cleanup
    line=$(tail -1 "$out/run/$tag.out")
    [ -n "$line" ] && echo "$line" | jq -e . >/dev/null 2>&1 || { log "no result line ($tag)"; return 0; }
    echo "$line" | jq -c \
        --arg part "$part" --arg variant "$variant" --argjson round "$round" \
        --argjson position "$position" --argjson load "$load" \
        --argjson cpu "$((cpu1 - cpu0))" --argjson bcpu "$((bcpu1 - bcpu0))" --argjson tck "$CLK_TCK" \
        --argjson polled "$(awk -v a="$polled0" -v b="$polled1" 'BEGIN {print b - a}')" '
        {part: $part, variant: $variant, round: $round, position: $position, load: $load,
         proxy_cpu_s: ($cpu / $tck), backend_cpu_s: ($bcpu / $tck)}
        + (if $part == "poll" and $variant == "wsrouter" then {router_polling_ok: $polled} else {} end)
        + {result: .}' >>"$RAW"
}

# --- main loop: rounds, the order flipped every round -------------------------

for round in $(seq "$runs"); do
    for part in "${part_list[@]}"; do
        case "$part" in
            ws) variants=(chat socketio) ;;
            poll) variants=(wsrouter haproxy) ;;
        esac
        if [ $((round % 2)) = 0 ]; then
            variants=("${variants[1]}" "${variants[0]}")
        fi
        run_one "$part" "${variants[0]}" "$round" 1
        run_one "$part" "${variants[1]}" "$round" 2
    done
done

echo "load at end: $(cut -d' ' -f1-3 /proc/loadavg); cpu pressure: $(head -1 /proc/pressure/cpu 2>/dev/null || echo n/a)" >>"$out/versions.txt"
rm -rf "$out/run"

# --- summary ---------------------------------------------------------------

summarize() {
    python3 - "$RAW" <<'PY'
import json, statistics, sys

rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]

def median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None

def fmt(x, d):
    if x is None:
        return "–"
    return f"{x:,.{d}f}"

def value(row, key):
    r = row["result"]
    cpu = row["proxy_cpu_s"]
    if row["part"] == "ws":
        relayed = 2 * r["messages"]["received"]
        return {
            "per_cpu": relayed / cpu if cpu > 0 else None,
            "us_per_msg": 1e6 * cpu / relayed if relayed > 0 else None,
            "rate": r["rates"]["messages_per_s"],
            "cpu": cpu,
            "bcpu": row["backend_cpu_s"],
            "errors": r.get("error_total", 0),
        }.get(key)
    reqs = r["requests"]
    return {
        "per_cpu": reqs / cpu if cpu > 0 else None,
        "us_per_req": 1e6 * cpu / reqs if reqs > 0 else None,
        "rate": r["requests_per_s"],
        "cpu": cpu,
        "bcpu": row["backend_cpu_s"],
        "p50": r["latency_us"]["p50"] / 1000,
        "p99": r["latency_us"]["p99"] / 1000,
        "errors": sum(r["errors"].values()),
    }.get(key)

def table(part, a, b, figures, title):
    sel = [r for r in rows if r["part"] == part]
    if not sel:
        return
    rounds = sorted({r["round"] for r in sel})
    by = {(r["round"], r["variant"]): r for r in sel}
    print(f"### {title}")
    print()
    print(f"| figure | {a} | {b} | {b} / {a} (medians) | same-round {b} / {a}: median (range, rounds above 1) |")
    print("| --- | ---: | ---: | ---: | --- |")
    for name, key, d in figures:
        va = median([value(by[(n, a)], key) for n in rounds if (n, a) in by])
        vb = median([value(by[(n, b)], key) for n in rounds if (n, b) in by])
        ratios = []
        for n in rounds:
            if (n, a) in by and (n, b) in by:
                x, y = value(by[(n, a)], key), value(by[(n, b)], key)
                if x and y is not None:
                    ratios.append(y / x)
        ratio = fmt(vb / va, 3) if va and vb is not None else "–"
        if ratios and key != "errors":
            same = (f"{statistics.median(ratios):.3f} ({min(ratios):.3f}-{max(ratios):.3f}, "
                    f"{sum(1 for x in ratios if x > 1)} of {len(ratios)})")
        else:
            same = "–"
        if key == "errors":
            va = sum(value(by[(n, a)], key) for n in rounds if (n, a) in by)
            vb = sum(value(by[(n, b)], key) for n in rounds if (n, b) in by)
            ratio = "–"
            name += " (sum)"
        print(f"| {name} | {fmt(va, d)} | {fmt(vb, d)} | {ratio} | {same} |")
    print()
    print(f"Per round ({a} / {b}; order: {a} first in odd rounds):")
    print()
    print(f"| round | load1 before | {a}: per CPU-s | {b}: per CPU-s | {a}: CPU s | {b}: CPU s | ratio per CPU-s |")
    print("| ---: | --- | ---: | ---: | ---: | ---: | ---: |")
    for n in rounds:
        ra, rb = by.get((n, a)), by.get((n, b))
        loads = "/".join(f'{x["load"]["load1"]:.2f}' for x in sorted([r for r in (ra, rb) if r], key=lambda r: r["position"]))
        pa = value(ra, "per_cpu") if ra else None
        pb = value(rb, "per_cpu") if rb else None
        print(f"| {n} | {loads} | {fmt(pa, 0)} | {fmt(pb, 0)} | {fmt(ra and ra['proxy_cpu_s'], 2)} | "
              f"{fmt(rb and rb['proxy_cpu_s'], 2)} | {fmt(pb / pa if pa and pb else None, 3)} |")
    print()

table("ws", "chat", "socketio", [
    ("64 B messages relayed per router CPU-second (both directions)", "per_cpu", 0),
    ("router CPU µs per relayed message", "us_per_msg", 3),
    ("round trips per second", "rate", 0),
    ("router CPU seconds (10 s load)", "cpu", 2),
    ("echo backend CPU seconds", "bcpu", 2),
    ("load generator errors", "errors", 0),
], "WebSocket: /chat against /socket.io/ (one router)")

table("poll", "haproxy", "wsrouter", [
    ("long-poll requests per proxy CPU-second", "per_cpu", 0),
    ("proxy CPU µs per request", "us_per_req", 2),
    ("requests per second", "rate", 0),
    ("proxy CPU seconds (10 s load)", "cpu", 2),
    ("HTTP backend CPU seconds", "bcpu", 2),
    ("p50 latency, ms", "p50", 3),
    ("p99 latency, ms", "p99", 3),
    ("wrk errors (connect, read, write, status, timeout)", "errors", 0),
], "Long-polling: HAProxy against wsrouter")

chk = [r for r in rows if r["part"] == "poll" and r["variant"] == "wsrouter"]
if chk:
    print("wsrouter's own count of long-polls answered (`wsrouter_polling_requests_total{result=\"ok\"}` "
          "over the measured run) against wrk's: "
          + ", ".join(f'{int(r["router_polling_ok"]):,}/{r["result"]["requests"]:,}' for r in chk) + ".")
    print()
PY
}

{
    echo "# Socket.IO benchmark$([ "$quick" = 1 ] && echo ' (QUICK SMOKE TEST: tiny sizes, not real figures)')"
    echo
    echo '```'
    cat "$out/versions.txt"
    echo '```'
    echo
    echo "Every run started the backend and the proxy afresh; the order of the two variants flips every round."
    echo "Relayed messages count both directions (an echo round trip is two relayed messages)."
    echo
    summarize
} >"$out/summary.md"

cat "$out/summary.md"
log "raw results: $RAW"
log "summary: $out/summary.md"
