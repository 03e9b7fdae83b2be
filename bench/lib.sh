# shellcheck shell=bash
# Shared by the bench/ scripts (compare, failover, memory, socketio,
# upgrade): sourced, not run. The sourcing script defines log and die
# first, and sets ROOT.

# Raise the open-files limit to the hard limit (a router holds two sockets
# per session, three while one re-dials).
raise_fd_limit() {
    ulimit -n "$(ulimit -Hn)" || true
    log "open files limit: $(ulimit -n)"
}

# Build the release binaries when $1 is 1 (the router, then the benchmark
# package's: loadgen, echo_backend and the byte tunnels that compare.sh can
# measure as yardsticks), then set WSROUTER (or $2, a router binary given on
# the command line), LOADGEN and ECHO. Two cargo runs, so that the router is
# built with its own features only, exactly as `cargo build --release` does.
release_binaries() {
    local build=$1 router_bin=$2 b
    if [ "$build" = 1 ]; then
        log "building release binaries (wsrouter, loadgen, echo_backend, the tunnels), niced"
        (cd "$ROOT" && nice -n 10 cargo build --release -p wsrouter --bin wsrouter \
            && nice -n 10 cargo build --release -p wsrouter-bench --bins)
    fi
    WSROUTER=${router_bin:-"$ROOT/target/release/wsrouter"}
    LOADGEN="$ROOT/target/release/loadgen"
    ECHO="$ROOT/target/release/echo_backend"
    for b in "$WSROUTER" "$LOADGEN" "$ECHO"; do
        [ -x "$b" ] || die "$b is missing (run without --no-build)"
    done
}

# True when nothing listens on HOST:PORT.
port_free() {
    ! (exec 3<>"/dev/tcp/${1%:*}/${1#*:}") 2>/dev/null
}

# SIGTERM, up to 5 s to go, then SIGKILL; reaps the process.
stop_pid() {
    local pid=$1 _
    [ -n "$pid" ] || return 0
    kill -TERM "$pid" 2>/dev/null || { wait "$pid" 2>/dev/null || true; return 0; }
    for _ in $(seq 50); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
}

# One WebSocket connect/upgrade/close to URL, retried for up to ~10 s.
probe_url() {
    local url=$1 _
    for _ in $(seq 100); do
        if "$LOADGEN" churn --url "$url" --cycles 1 --concurrency 1 --connect-timeout 1s \
            --time-limit 3s >/dev/null 2>&1; then
            return 0
        fi
        sleep 0.1
    done
    return 1
}

# A process and all its descendants (nginx workers, say).
tree() {
    local pid=$1 child
    [ -d "/proc/$pid" ] || return 0
    echo "$pid"
    for child in $(ps -o pid= --ppid "$pid" 2>/dev/null); do
        tree "$child"
    done
}

# utime+stime in clock ticks, summed over a process tree.
cpu_ticks() {
    local total=0 pid fields
    [ -n "$1" ] || { echo 0; return; }
    for pid in $(tree "$1"); do
        # Fields after "(comm)": state is 1st, utime 12th, stime 13th.
        fields=$(sed 's/^.*) //' "/proc/$pid/stat" 2>/dev/null) || continue
        total=$((total + $(echo "$fields" | awk '{print $12 + $13}')))
    done
    echo "$total"
}
