#!/usr/bin/env bash
# Upgrade benchmark (issue 16): the router upgraded in place (SIGUSR2) under
# 8,000 idle sessions, 200 active ones and a new client every 10 ms, and
# what the clients saw. See BENCHMARKS.md, "Upgrade without closing a
# session (issue 16)".
#
#   bench/upgrade.sh                       # 8,000 idle + 200 active, one run (30 to 80 s)
#   bench/upgrade.sh --runs 3 --no-build   # three runs, one JSON line each
#   bench/upgrade.sh --idle 1000 --active 50
#
# Per run: echo backends 127.0.0.1:19201 and :19202 and the release router
# with bench/upgrade.toml (public 127.0.0.1:18280, admin 127.0.0.1:19290,
# two session threads) and --pid-file are started afresh. The load generator
# (loadgen upgrade) opens the active sessions (each sends a numbered
# 64-byte message --rate times a second and checks every echo), starts a
# new client every --connect-every (connect, upgrade, one echo, close),
# opens the idle sessions in batches of 500 every 500 ms, each with its own
# session key; --steady later it sends SIGUSR2 to the pid in the pid file,
# follows the old process until it exits and the new one's pid in the pid
# file, samples both processes' VmRSS and VmHWM every 100 ms, reads the
# router's /metrics before the signal and --after-exit after the exit, then
# stops everything and reports. One JSON line per run is printed on stdout
# (and kept in raw.jsonl), a summary on stderr. A run takes about 30 s when
# every session moves, 80 s when some stay in the old process until
# [upgrade] old_process_timeout (60 s in bench/upgrade.toml).
#
# Everything started here is stopped by pid (the new router process, which
# the old one started, by the pid in the pid file, after checking that it
# runs the router binary). Results:
# bench/results/upgrade-<date>/{raw.jsonl,versions.txt,run*-loadgen.json,logs/}.

set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BENCH="$ROOT/bench"

E1_ADDR=127.0.0.1:19201
E2_ADDR=127.0.0.1:19202
PROXY_ADDR=127.0.0.1:18280
ADMIN_ADDR=127.0.0.1:19290

idle=8000
active=200
rate=20
connect_every=10ms
steady=5s
after_exit=5s
exit_timeout=90s
runs=1
build=1
log_level="warn,wsrouter::upgrade=info,wsrouter::app=info"
config="$BENCH/upgrade.toml"
wsrouter=""
out=""

usage() {
    cat <<EOF
usage: bench/upgrade.sh [options]

  --idle N            idle sessions (default $idle)
  --active N          active sessions, numbered messages checked (default $active)
  --rate R            messages per second per active session (default $rate)
  --connect-every D   one new client (connect, upgrade, echo, close) this often (default $connect_every)
  --steady D          from the last session open to SIGUSR2 (default $steady)
  --after-exit D      keep going this long after the old process exits (default $after_exit)
  --exit-timeout D    give up waiting for the old process to exit (default $exit_timeout)
  --runs N            repeat the whole benchmark N times (default 1)
  --log-level L       the router's RUST_LOG (default $log_level)
  --config FILE       router configuration (default bench/upgrade.toml)
  --wsrouter BIN      router binary (default target/release/wsrouter)
  --no-build          use the binaries already in target/release
  --out DIR           results folder (default bench/results/upgrade-<date>)
  -h, --help          this text
EOF
}

while [ $# -gt 0 ]; do
    case "$1" in
        --idle) idle=$2; shift 2 ;;
        --active) active=$2; shift 2 ;;
        --rate) rate=$2; shift 2 ;;
        --connect-every) connect_every=$2; shift 2 ;;
        --steady) steady=$2; shift 2 ;;
        --after-exit) after_exit=$2; shift 2 ;;
        --exit-timeout) exit_timeout=$2; shift 2 ;;
        --runs) runs=$2; shift 2 ;;
        --log-level) log_level=$2; shift 2 ;;
        --config) config=$2; shift 2 ;;
        --wsrouter) wsrouter=$2; shift 2 ;;
        --no-build) build=0; shift ;;
        --out) out=$2; shift 2 ;;
        -h|--help) usage; exit 0 ;;
        *) echo "upgrade.sh: unknown option $1" >&2; usage >&2; exit 64 ;;
    esac
done

die() { echo "upgrade.sh: $*" >&2; exit 1; }
log() { echo "[upgrade] $*" >&2; }
# shellcheck source=bench/lib.sh
. "$BENCH/lib.sh"

[[ "$idle" =~ ^[0-9]{1,4}$ ]] || die "--idle must be between 0 and 9999"
[[ "$active" =~ ^[1-9][0-9]{0,3}$ ]] || die "--active must be between 1 and 9999"
[ $((idle + active)) -le 9000 ] \
    || die "--idle plus --active must be at most 9000 (one router holds ~9,900 sessions under 20,000 open files; [limits] max_sessions = 9000)"
[[ "$rate" =~ ^[0-9]+(\.[0-9]+)?$ ]] || die "--rate must be a number"
[[ "$runs" =~ ^[1-9]$ ]] || die "--runs must be between 1 and 9"
for d in "$connect_every" "$steady" "$after_exit" "$exit_timeout"; do
    [[ "$d" =~ ^[0-9]+(ms|s|m)$ ]] || die "durations are written like 10ms, 5s, 2m (got $d)"
done
[[ "$log_level" =~ ^[a-z,=_:]+$ ]] || die "--log-level: e.g. warn, info, warn,wsrouter::upgrade=info"
[ -f "$config" ] || die "no config file $config"
config=$(realpath "$config")
for tool in jq curl; do
    command -v "$tool" >/dev/null || die "$tool is needed"
done

raise_fd_limit
release_binaries "$build" "$wsrouter"
WSROUTER=$(realpath "$WSROUTER")

stamp=$(date +%Y%m%d-%H%M%S)
[ -n "$out" ] || out="$BENCH/results/upgrade-$stamp"
mkdir -p "$out/logs"
out=$(realpath "$out")
RAW="$out/raw.jsonl"
: >"$RAW"
commit="$(cd "$ROOT" && git rev-parse --short HEAD 2>/dev/null || echo unknown)$(cd "$ROOT" && git diff --quiet HEAD -- src 2>/dev/null || echo ' (src modified)')"
[ -z "$wsrouter" ] || commit="$commit (router binary: $wsrouter)"
{
    echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "wsrouter: $commit (HEAD now; the binary $WSROUTER was built $(date -u -r "$WSROUTER" +%Y-%m-%dT%H:%M:%SZ))"
    echo "rustc: $(rustc --version 2>/dev/null || echo unknown)"
    echo "kernel: $(uname -sr)"
    echo "cpus: $(nproc) ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ //'))"
    echo "memory: $(awk '/MemTotal/ {printf "%.1f GiB", $2/1048576}' /proc/meminfo)"
    echo "open files: $(ulimit -n); somaxconn $(cat /proc/sys/net/core/somaxconn); tcp_max_syn_backlog $(cat /proc/sys/net/ipv4/tcp_max_syn_backlog)"
    echo "idle $idle, active $active at $rate/s, new client every $connect_every, steady $steady, after exit $after_exit, RUST_LOG=$log_level"
    echo "config: $config"
} >"$out/versions.txt"

e1_pid=""
e2_pid=""
router_pid=""
pid_file=""

# True when PID runs the router binary and is not a zombie.
is_router() {
    local pid=$1
    [ -n "$pid" ] && [ -r "/proc/$pid/stat" ] || return 1
    [ "$(readlink "/proc/$pid/exe" 2>/dev/null || true)" = "$WSROUTER" ] || return 1
    ! awk '{ sub(/^.*\) /, ""); exit ($1 == "Z" ? 0 : 1) }' "/proc/$pid/stat"
}

# Stop the router process that the pid file names when it is not our
# child (the new process after an upgrade): SIGTERM, up to 10 s, SIGKILL.
stop_successor() {
    local pid _
    [ -n "$pid_file" ] && [ -f "$pid_file" ] || return 0
    pid=$(tr -dc '0-9' <"$pid_file")
    [ -n "$pid" ] && [ "$pid" != "$router_pid" ] || return 0
    is_router "$pid" || return 0
    kill -TERM "$pid" 2>/dev/null || return 0
    for _ in $(seq 100); do
        is_router "$pid" || return 0
        sleep 0.1
    done
    log "the router $pid did not stop within 10 s of SIGTERM; SIGKILL"
    kill -KILL "$pid" 2>/dev/null || true
}

cleanup() {
    stop_successor
    stop_pid "$router_pid"
    router_pid=""
    stop_pid "$e1_pid"
    e1_pid=""
    stop_pid "$e2_pid"
    e2_pid=""
}
trap cleanup EXIT
trap 'exit 130' INT TERM

run_one() {
    local run=$1 tag="run$1"
    for addr in "$E1_ADDR" "$E2_ADDR" "$PROXY_ADDR" "$ADMIN_ADDR"; do
        port_free "$addr" || die "$addr is already in use; stop whatever listens there"
    done
    pid_file="$out/$tag-wsrouter.pid"
    rm -f "$pid_file"
    "$ECHO" --listen "$E1_ADDR" 2>"$out/logs/$tag-echo-1.log" &
    e1_pid=$!
    "$ECHO" --listen "$E2_ADDR" 2>"$out/logs/$tag-echo-2.log" &
    e2_pid=$!
    # The new process inherits this working directory, these arguments and
    # this stderr (both processes log to the same file).
    (cd "$(dirname "$config")" && RUST_LOG=$log_level exec "$WSROUTER" --config "$config" --pid-file "$pid_file") \
        2>"$out/logs/$tag-router.log" &
    router_pid=$!
    probe_url "ws://$PROXY_ADDR/chat" || die "the router does not relay WebSocket upgrades (see $out/logs/$tag-*.log)"
    curl -fsS -o /dev/null "http://$ADMIN_ADDR/readyz" || die "wsrouter is not ready"
    [ "$(tr -dc '0-9' <"$pid_file" 2>/dev/null || true)" = "$router_pid" ] \
        || die "the pid file $pid_file does not name the router ($router_pid)"
    sleep 0.3
    log "run $run: $idle idle + $active active sessions, new client every $connect_every; SIGUSR2 to $router_pid $steady after they are open"
    local rc=0
    "$LOADGEN" upgrade --url "ws://$PROXY_ADDR/chat" -c "$active" --idle "$idle" --rate "$rate" --size 64 \
        --connect-every "$connect_every" --batch 500 --batch-interval 500ms --connect-concurrency 100 \
        --steady "$steady" --after-exit "$after_exit" --exit-timeout "$exit_timeout" --drain 5s \
        --sample-interval 100ms --read-buffer 4096 --connect-timeout 5s \
        --pid-file "$pid_file" --metrics-url "http://$ADMIN_ADDR/metrics" \
        --label "upgrade-$tag" --time-limit 300s \
        >"$out/$tag-loadgen.json" 2>"$out/logs/$tag-loadgen.log" || rc=$?
    [ "$rc" = 0 ] || log "loadgen exited with $rc"
    # The old process: exited (with its status), or still running.
    local old_status="running"
    if is_router "$router_pid"; then
        log "the old router process $router_pid is still running"
    else
        local s=0
        wait "$router_pid" 2>/dev/null || s=$?
        old_status="exited $s"
        router_pid=""
    fi
    local new_pid new_alive=false
    new_pid=$(tr -dc '0-9' <"$pid_file" 2>/dev/null || true)
    if [ -n "$new_pid" ] && [ "$new_pid" != "$router_pid" ] && is_router "$new_pid"; then
        new_alive=true
    else
        log "no running new router process (pid file: ${new_pid:-none})"
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
    echo "$line" | jq -c --argjson run "$run" --arg commit "$commit" --arg old_status "$old_status" \
        --argjson new_alive "$new_alive" --argjson warnings "$warnings" '
        def mib(k): if k then (k / 1024 * 10 | round) / 10 else null end;
        .upgrade as $u
        | ($u.router_after_exit // {}) as $m
        | {
            benchmark: "upgrade",
            run: $run,
            wsrouter: $commit,
            idle_sessions: $u.sessions.idle,
            active_sessions: $u.sessions.active,
            sessions_failed_to_open: ($u.sessions.idle_failed_to_open + $u.sessions.active_failed_to_open),
            sessions_active_before_signal: $u.router_before_signal.sessions_active,
            handed_over: ($m.handover_sessions.received // null),
            handover_refused: (($m.handover_sessions // {}) | to_entries | map(select(.key != "received") | .value) | add // 0),
            sessions_active_after_exit: $m.sessions_active,
            client_closes: $u.closes.total,
            idle_closed: $u.closes.idle,
            idle_first_ping_after_signal_ms: $u.closes.idle_first_ping_after_signal_ms,
            active_closed: $u.closes.active,
            lost_messages: $u.messages.lost,
            lost_in_open_sessions: $u.messages.lost_in_open_sessions,
            duplicated_messages: $u.messages.duplicated,
            reordered_messages: $u.messages.reordered,
            messages_sent: $u.messages.sent,
            new_clients: $u.new_clients.attempted,
            new_clients_failed: $u.new_clients.failed,
            new_clients_during_upgrade: $u.new_clients.by_phase.during.attempted,
            new_clients_failed_during_upgrade: $u.new_clients.failed_during_upgrade,
            new_clients_refused: ([$u.new_clients.by_phase[] | .refused] | add),
            new_clients_reset: ([$u.new_clients.by_phase[] | .reset] | add),
            new_client_connect_ms_during: $u.new_clients.connect_ms_during,
            echo_gap_ms_first_5s: $u.echo_gap_ms.first_5s,
            echo_gap_ms_during: $u.echo_gap_ms.during,
            echo_gap_ms_before: $u.echo_gap_ms.before,
            round_trip_ms_during: $u.round_trip_ms.during,
            router_pause_ms: (($u.router_early // {}).handover_pause // $m.handover_pause),
            router_pause_ms_after_exit: $m.handover_pause,
            signal_to_new_pid_file_ms: $u.signal_to_new_pid_file_ms,
            signal_to_old_exit_ms: $u.signal_to_old_exit_ms,
            old_process: $old_status,
            new_process_running_at_end: $new_alive,
            old_hwm_mib: mib($u.processes.old.hwm_kib),
            new_hwm_mib: mib($u.processes.new.hwm_kib),
            both_rss_mib_peak: mib($u.processes.rss_kib_both_peak),
            router_warnings: $warnings,
            loadgen: .
          }' >>"$RAW"
    tail -1 "$RAW"
}

for run in $(seq "$runs"); do
    run_one "$run"
done

log "raw results: $RAW"
jq -r '
    def p(x): if x == null then "n/a" else "p50 \(x.p50), p99 \(x.p99), max \(x.max) ms" end;
    def rp(x): if x == null or x.format == "absent" then "n/a"
        elif x.format == "histogram" then "p50 <= \(x.p50_ms_bucket_bound), p99 <= \(x.p99_ms_bucket_bound) ms (bucket bounds), count \(x.count)"
        else "p50 \(x.p50_ms), p99 \(x.p99_ms), max \(x.max_ms) ms (summary quantiles), mean \(x.mean_ms) ms, count \(x.count)" end;
    "[upgrade] run \(.run): handed over \(.handed_over) (refused \(.handover_refused)); client closes \(.client_closes) (idle \(.idle_closed), active \(.active_closed)); lost \(.lost_messages) (\(.lost_in_open_sessions) in sessions not closed), duplicated \(.duplicated_messages), reordered \(.reordered_messages) of \(.messages_sent)",
    "[upgrade]   new clients: \(.new_clients) (\(.new_clients_during_upgrade) during the upgrade), failed \(.new_clients_failed) (during \(.new_clients_failed_during_upgrade); refused \(.new_clients_refused), reset \(.new_clients_reset))",
    "[upgrade]   largest echo gap per active session: first 5 s after the signal \(p(.echo_gap_ms_first_5s)); signal to old exit + 1 s \(p(.echo_gap_ms_during)); steady, before: \(p(.echo_gap_ms_before))",
    "[upgrade]   router pause: \(rp(.router_pause_ms))",
    "[upgrade]   signal to old exit \(.signal_to_old_exit_ms) ms (new pid file after \(.signal_to_new_pid_file_ms) ms); old \(.old_process); VmHWM old \(.old_hwm_mib) MiB, new \(.new_hwm_mib) MiB, both at once \(.both_rss_mib_peak) MiB"
' "$RAW" >&2
