#!/usr/bin/env bash
# Memory bounds (issue 11): router RSS under large and partial messages, and
# router CPU per small message, for two router binaries (BEFORE and AFTER a
# change) in one invocation, alternating. See BENCHMARKS.md, "Memory bounds
# (issue 11)".
#
#   bench/memory.sh --before OLD/wsrouter --after NEW/wsrouter \
#       --loadgen NEW/loadgen --echo NEW/echo_backend --runs 3
#
# Everything runs on loopback with the ports and configuration of
# bench/compare.sh (echo backend 127.0.0.1:19001, router 127.0.0.1:18080,
# admin 127.0.0.1:19090, bench/wsrouter.toml). Per round, for each binary
# (the order flips every round), each scenario on a fresh router and echo
# backend:
#
#   cpu        the compare.sh throughput workload (loadgen throughput -c 50
#              --window 16 --size 64 --duration 10s --warmup 1s); router
#              CPU = utime+stime from /proc/PID/stat (and the exact
#              schedstat time) from just before the load generator starts
#              to just after it ends, per relayed message (2 per echo).
#   idleburst  (a) --sessions idle sessions (loadgen idle), RSS 1 s after
#              the last opened; (b) with them still open, --burst-sessions
#              more sessions each send --burst-messages binary messages of
#              --burst-size bytes one after the other, each waiting for its
#              echo (a Python client with raw sockets, below); RSS right
#              after the last echo, then the burst sessions sit idle and
#              RSS is read again --settle seconds later.
#   partial    (c) --partial-sessions sessions each send one frame header
#              announcing --partial-size bytes and then all but the last
#              byte, and wait; RSS 2 s after they are all sent (or stalled:
#              no byte taken by any socket for 3 s), and again 3 s later.
#   partial-limit  (AFTER only) the same with [limits] max_buffered_bytes =
#              --limit-bytes; GET /api/memory and closes by reason recorded.
#
# RSS is VmRSS of the router process (VmHWM, its peak, is recorded too).
# For a router that serves GET /api/memory (AFTER) its answer is recorded at
# every RSS reading. Every load is bounded in count and in time.
# Output: --out DIR (default bench/results/memory-<date>/): raw.jsonl (one
# line per scenario run), summary.md (medians, after/before ratios),
# versions.txt, logs/ (each process's stderr; logs over 1 MB are deleted).

set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BENCH="$ROOT/bench"

BACKEND_ADDR=127.0.0.1:19001
PROXY_ADDR=127.0.0.1:18080
ADMIN_ADDR=127.0.0.1:19090
URL="ws://$PROXY_ADDR/chat"

before_bin=""
after_bin=""
LOADGEN="$ROOT/target/release/loadgen"
ECHO="$ROOT/target/release/echo_backend"
runs=3
out=""
quick=0
sessions=1000
burst_sessions=20
burst_messages=64
burst_size=1000000
settle=15
partial_sessions=300
partial_size=1048000
limit_bytes=67108864
cpu_duration=10s
labels="before,after"

usage() {
    cat <<EOF
usage: bench/memory.sh --before BIN --after BIN [options]

  --before BIN, --after BIN   the two router binaries (required)
  --loadgen BIN, --echo BIN   load generator and echo backend
                              (default target/release/{loadgen,echo_backend})
  --labels A,B                names for the two binaries in the output (default before,after)
  --runs N                    rounds; each runs every scenario once per binary (default 3)
  --sessions N                idle sessions for (a) (default 1000)
  --burst-sessions N          (b) sessions (default 20)
  --burst-messages N          (b) messages per session, one at a time (default 64)
  --burst-size BYTES          (b) message size (default 1000000)
  --settle S                  (b) seconds idle after the burst before the second reading (default 15)
  --partial-sessions N        (c) sessions (default 300)
  --partial-size BYTES        (c) payload length announced (default 1048000)
  --limit-bytes BYTES         (c) max_buffered_bytes of the AFTER-only limit run (default 67108864)
  --quick                     smoke-test sizes (1 round, 100 idle, 4 x 8 burst, 30 partial, 3 s CPU run)
  --out DIR                   results folder (default bench/results/memory-<date>[-quick])
  -h, --help                  this text
EOF
}

while [ $# -gt 0 ]; do
    case "$1" in
        --before) before_bin=$2; shift 2 ;;
        --after) after_bin=$2; shift 2 ;;
        --loadgen) LOADGEN=$2; shift 2 ;;
        --echo) ECHO=$2; shift 2 ;;
        --labels) labels=$2; shift 2 ;;
        --runs) runs=$2; shift 2 ;;
        --sessions) sessions=$2; shift 2 ;;
        --burst-sessions) burst_sessions=$2; shift 2 ;;
        --burst-messages) burst_messages=$2; shift 2 ;;
        --burst-size) burst_size=$2; shift 2 ;;
        --settle) settle=$2; shift 2 ;;
        --partial-sessions) partial_sessions=$2; shift 2 ;;
        --partial-size) partial_size=$2; shift 2 ;;
        --limit-bytes) limit_bytes=$2; shift 2 ;;
        --quick) quick=1; shift ;;
        --out) out=$2; shift 2 ;;
        -h|--help) usage; exit 0 ;;
        *) echo "memory.sh: unknown option $1" >&2; usage >&2; exit 64 ;;
    esac
done

die() { echo "memory.sh: $*" >&2; exit 1; }
log() { echo "[memory $(date +%H:%M:%S)] $*" >&2; }
# shellcheck source=bench/lib.sh
. "$BENCH/lib.sh"

if [ "$quick" = 1 ]; then
    runs=1 sessions=100 burst_sessions=4 burst_messages=8 settle=3 partial_sessions=30 cpu_duration=3s
fi
[ -n "$before_bin" ] && [ -n "$after_bin" ] || { usage >&2; exit 64; }
for b in "$before_bin" "$after_bin" "$LOADGEN" "$ECHO"; do
    [ -x "$b" ] || die "$b is missing or not executable"
done
[[ "$runs" =~ ^[1-9][0-9]?$ ]] || die "--runs must be between 1 and 99"
for v in sessions burst_sessions burst_messages burst_size settle partial_sessions partial_size limit_bytes; do
    [[ "${!v}" =~ ^[0-9]+$ ]] || die "--${v//_/-} must be a whole number"
done
[ "$sessions" -le 9000 ] || die "--sessions: at most 9000 (20,000 open files per process)"
[ "$burst_sessions" -le 100 ] && [ "$burst_messages" -le 1000 ] || die "--burst-sessions at most 100, --burst-messages at most 1000"
[ "$burst_size" -ge 16 ] && [ "$burst_size" -le 1048576 ] || die "--burst-size between 16 and 1048576 (the router's max_message_bytes)"
[ "$partial_sessions" -le 2000 ] || die "--partial-sessions: at most 2000"
[ "$partial_size" -ge 2 ] && [ "$partial_size" -le 1048576 ] || die "--partial-size between 2 and 1048576"
[ "$settle" -le 120 ] || die "--settle: at most 120"
IFS=, read -r label_before label_after <<<"$labels"
[ -n "$label_before" ] && [ -n "$label_after" ] || die "--labels takes two names, A,B"
command -v python3 >/dev/null || die "python3 is needed"
command -v curl >/dev/null || die "curl is needed"

raise_fd_limit

stamp=$(date +%Y%m%d-%H%M%S)
[ -n "$out" ] || out="$BENCH/results/memory-$stamp$([ "$quick" = 1 ] && echo -quick)"
mkdir -p "$out/logs" "$out/run"
RAW="$out/raw.jsonl"
: >"$RAW"
CLK_TCK=$(getconf CLK_TCK)

# The limit run's configuration: bench/wsrouter.toml with the GeoIP path
# made absolute (it is relative to the configuration's folder) and the budget.
LIMIT_CONFIG="$out/run/wsrouter-limit.toml"
sed "s|^database = \"\.\./geoip/|database = \"$ROOT/geoip/|" "$BENCH/wsrouter.toml" >"$LIMIT_CONFIG"
printf '\n[limits]\nmax_buffered_bytes = %s\n' "$limit_bytes" >>"$LIMIT_CONFIG"

{
    echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "mode: $([ "$quick" = 1 ] && echo 'quick (smoke test sizes)' || echo full); rounds: $runs"
    echo "$label_before: $before_bin (sha256 $(sha256sum "$before_bin" | cut -c1-16))"
    echo "$label_after: $after_bin (sha256 $(sha256sum "$after_bin" | cut -c1-16))"
    echo "loadgen: $LOADGEN; echo backend: $ECHO"
    echo "sizes: idle $sessions; burst $burst_sessions x $burst_messages x $burst_size B, settle ${settle}s; partial $partial_sessions x $partial_size B announced; limit run max_buffered_bytes $limit_bytes; cpu: throughput -c 50 --window 16 --size 64 --duration $cpu_duration"
    echo "rustc: $(rustc --version 2>/dev/null || echo unknown); python: $(python3 --version 2>&1)"
    echo "kernel: $(uname -sr)"
    echo "cpus: $(nproc) ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ //'))"
    echo "memory: $(awk '/MemTotal/ {printf "%.1f GiB", $2/1048576}' /proc/meminfo)"
    echo "load at start: $(cut -d' ' -f1-3 /proc/loadavg); cpu pressure: $(head -1 /proc/pressure/cpu 2>/dev/null || echo n/a)"
} >"$out/versions.txt"

# --- the WebSocket client for (b) and (c): standard library only ---------------

# Client frames are masked; the payloads are zeros, so the masked payload is
# the masking key repeated and costs nothing to make. Modes:
#   burst HOST PORT PATH SESSIONS MESSAGES SIZE READY HOLD_MAX
#   partial HOST PORT PATH SESSIONS SIZE READY HOLD_MAX
# Each writes a JSON object to READY when its load is done, then holds the
# sessions open until SIGTERM (or HOLD_MAX seconds), closes them and prints
# one JSON line.
read -r -d '' CLIENT_PY <<'PY' || true
import base64, json, os, selectors, signal, socket, struct, sys, threading, time

stop = threading.Event()
signal.signal(signal.SIGTERM, lambda *_: stop.set())
signal.signal(signal.SIGINT, lambda *_: stop.set())

def header(opcode, n, fin=True):
    b0 = (0x80 if fin else 0) | opcode
    if n < 126:
        return struct.pack("!BB", b0, 0x80 | n)
    if n < 65536:
        return struct.pack("!BBH", b0, 0x80 | 126, n)
    return struct.pack("!BBQ", b0, 0x80 | 127, n)

def mask(data, key):
    return bytes(b ^ key[i % 4] for i, b in enumerate(data))

def control(opcode, payload=b""):
    key = os.urandom(4)
    return header(opcode, len(payload)) + key + mask(payload, key)

def upgrade(host, port, path, timeout=10.0):
    s = socket.create_connection((host, port), timeout=timeout)
    key = base64.b64encode(os.urandom(16)).decode()
    s.sendall((f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
               f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
               f"Sec-WebSocket-Version: 13\r\n\r\n").encode())
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = s.recv(4096)
        if not chunk:
            raise ConnectionError("closed during the upgrade")
        buf += chunk
        if len(buf) > 16384:
            raise ConnectionError("upgrade answer too long")
    head, rest = buf.split(b"\r\n\r\n", 1)
    status = head.split(b"\r\n", 1)[0]
    if status.split(b" ")[1:2] != [b"101"]:
        raise ConnectionError(status.decode(errors="replace"))
    return s, bytearray(rest)

class Conn:
    def __init__(self, sock, rest):
        self.s, self.buf = sock, rest
    def fill(self, mv):
        got = min(len(mv), len(self.buf))
        if got:
            mv[:got] = self.buf[:got]
            del self.buf[:got]
        while got < len(mv):
            n = self.s.recv_into(mv[got:])
            if n == 0:
                raise ConnectionError("closed by the router")
            got += n
    def exact(self, n):
        b = bytearray(n)
        self.fill(memoryview(b))
        return b
    def message(self, into):
        """One data message (into `into` when it fits); answers pings."""
        total = 0
        while True:
            h = self.exact(2)
            op, fin, n = h[0] & 0x0F, h[0] >> 7, h[1] & 0x7F
            if n == 126:
                n = struct.unpack("!H", self.exact(2))[0]
            elif n == 127:
                n = struct.unpack("!Q", self.exact(8))[0]
            if h[1] & 0x80:
                raise ConnectionError("masked frame from the router")
            if op >= 8:
                payload = self.exact(n)
                if op == 9:
                    self.s.sendall(control(10, bytes(payload)))
                elif op == 8:
                    code = struct.unpack("!H", payload[:2])[0] if n >= 2 else None
                    raise ConnectionError(f"close {code}")
                continue
            if total + n <= len(into):
                self.fill(memoryview(into)[total:total + n])
            else:
                self.exact(n)
            total += n
            if fin:
                return total

def close_all(socks, deadline=3.0):
    for s in socks:
        try:
            s.setblocking(True)
            s.settimeout(1.0)
            s.sendall(control(8, struct.pack("!H", 1000)))
        except OSError:
            pass
    end = time.monotonic() + deadline
    for s in socks:
        try:
            s.settimeout(max(0.01, end - time.monotonic()))
            while s.recv(65536):
                pass
        except OSError:
            pass
        s.close()

def hold(hold_max):
    end = time.monotonic() + hold_max
    while not stop.is_set() and time.monotonic() < end:
        stop.wait(0.2)

def burst(host, port, path, sessions, messages, size, ready, hold_max):
    conns = []
    for _ in range(sessions):
        s, rest = upgrade(host, port, path)
        s.settimeout(60.0)
        conns.append(Conn(s, rest))
    result = {"sessions": sessions, "messages_per_session": messages, "size": size,
              "echoes": 0, "bad_echoes": 0, "errors": [], "round_trip_ms": []}
    lock = threading.Lock()
    barrier = threading.Barrier(sessions + 1)
    zeros = bytes(size - 8)

    def worker(c):
        key = os.urandom(4)
        head = header(2, size) + key
        rest = (key * ((size - 8) // 4 + 1))[:size - 8]
        into = bytearray(size)
        times, ok, bad = [], 0, 0
        barrier.wait()
        try:
            for seq in range(messages):
                if stop.is_set():
                    break
                sb = struct.pack("<Q", seq)
                t0 = time.monotonic()
                c.s.sendall(head + mask(sb, key))
                c.s.sendall(rest)
                n = c.message(into)
                times.append((time.monotonic() - t0) * 1000)
                if n == size and into[:8] == sb and into[8:] == zeros:
                    ok += 1
                else:
                    bad += 1
        except Exception as e:
            with lock:
                result["errors"].append(repr(e))
        with lock:
            result["echoes"] += ok
            result["bad_echoes"] += bad
            result["round_trip_ms"] += times

    threads = [threading.Thread(target=worker, args=(c,)) for c in conns]
    for t in threads:
        t.start()
    barrier.wait()
    t0 = time.monotonic()
    for t in threads:
        t.join()
    result["burst_s"] = round(time.monotonic() - t0, 3)
    rt = sorted(result.pop("round_trip_ms"))
    if rt:
        result["round_trip_ms"] = {"p50": round(rt[len(rt) // 2], 2), "max": round(rt[-1], 2)}
    result["mib_echoed_per_s"] = round(result["echoes"] * size / 1048576 / max(result["burst_s"], 1e-9), 1)
    with open(ready + ".tmp", "w") as f:
        json.dump(result, f)
    os.rename(ready + ".tmp", ready)
    hold(hold_max)
    close_all([c.s for c in conns])
    print(json.dumps(result))

def partial(host, port, path, sessions, size, ready, hold_max):
    key = os.urandom(4)
    body = header(2, size) + key + (key * (size // 4 + 1))[:size - 1]
    view = memoryview(body)
    conns, opened, errors = [], 0, []
    for _ in range(sessions):
        try:
            s, rest = upgrade(host, port, path)
        except OSError as e:
            errors.append(repr(e))
            continue
        s.setblocking(False)
        conns.append({"s": s, "off": 0, "in": rest, "closed": None})
        opened += 1
    sel = selectors.DefaultSelector()
    for i, c in enumerate(conns):
        sel.register(c["s"], selectors.EVENT_READ | selectors.EVENT_WRITE, i)
    closes = {}

    def on_read(c):
        try:
            data = c["s"].recv(65536)
        except BlockingIOError:
            return
        except OSError as e:
            data, c["closed"] = b"", repr(e)
        if not data:
            c["closed"] = c["closed"] or "eof"
        c["in"] += data
        buf = c["in"]
        while len(buf) >= 2:
            n, at = buf[1] & 0x7F, 2
            if n == 126:
                if len(buf) < 4: break
                n, at = struct.unpack("!H", buf[2:4])[0], 4
            elif n == 127:
                if len(buf) < 10: break
                n, at = struct.unpack("!Q", buf[2:10])[0], 10
            if len(buf) < at + n: break
            op, payload = buf[0] & 0x0F, bytes(buf[at:at + n])
            del buf[:at + n]
            if op == 8:
                code = str(struct.unpack("!H", payload[:2])[0]) if n >= 2 else "none"
                c["closed"] = "close " + code
            elif op == 9 and c["closed"] is None:
                try:
                    c["s"].send(control(10, payload))
                except OSError:
                    pass
        if c["closed"] is not None:
            closes[c["closed"]] = closes.get(c["closed"], 0) + 1
            sel.unregister(c["s"])

    t0 = last_progress = time.monotonic()
    pending = set(range(len(conns)))
    while pending and not stop.is_set():
        now = time.monotonic()
        if now - last_progress > 3.0 or now - t0 > 30.0:
            break
        for key_, ev in sel.select(0.2):
            c = conns[key_.data]
            if ev & selectors.EVENT_READ:
                on_read(c)
            if c["closed"] is not None:
                pending.discard(key_.data)
                continue
            if ev & selectors.EVENT_WRITE and c["off"] < len(body):
                try:
                    n = c["s"].send(view[c["off"]:c["off"] + 262144])
                except BlockingIOError:
                    n = 0
                except OSError as e:
                    c["closed"] = repr(e)
                    closes[c["closed"]] = closes.get(c["closed"], 0) + 1
                    sel.unregister(c["s"])
                    pending.discard(key_.data)
                    continue
                if n:
                    c["off"] += n
                    last_progress = time.monotonic()
                if c["off"] >= len(body):
                    sel.modify(c["s"], selectors.EVENT_READ, key_.data)
                    pending.discard(key_.data)
    sent = [c["off"] for c in conns]
    payload_sent = [max(0, o - (len(body) - (size - 1))) for o in sent]
    def snapshot():
        return {"sessions": sessions, "opened": opened, "announced": size,
                "fully_sent": sum(1 for c in conns if c["off"] >= len(body)),
                "payload_mib_sent": round(sum(payload_sent) / 1048576, 1),
                "closed_by_router": dict(closes), "errors": errors[:5]}
    result = snapshot()
    result["send_s"] = round(time.monotonic() - t0, 3)
    with open(ready + ".tmp", "w") as f:
        json.dump(result, f)
    os.rename(ready + ".tmp", ready)
    # Wait, watching for closes, until told to stop.
    for i, c in enumerate(conns):
        if c["closed"] is None:
            try:
                sel.modify(c["s"], selectors.EVENT_READ, i)
            except (KeyError, ValueError):
                pass
    end = time.monotonic() + hold_max
    while not stop.is_set() and time.monotonic() < end:
        for key_, ev in sel.select(0.2):
            on_read(conns[key_.data])
    result["closed_by_router_at_end"] = dict(closes)
    for c in conns:
        c["s"].close()
    print(json.dumps(result))

mode, host, port, path = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
if mode == "burst":
    s, m, z, ready, hmax = sys.argv[5:10]
    burst(host, port, path, int(s), int(m), int(z), ready, float(hmax))
else:
    s, z, ready, hmax = sys.argv[5:9]
    partial(host, port, path, int(s), int(z), ready, float(hmax))
PY

# --- processes -------------------------------------------------------------

backend_pid=""
router_pid=""
client_pid=""
idle_pid=""

cleanup() {
    stop_pid "$client_pid"; client_pid=""
    stop_pid "$idle_pid"; idle_pid=""
    stop_pid "$router_pid"; router_pid=""
    stop_pid "$backend_pid"; backend_pid=""
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# "VmRSS VmHWM" of a process, in KiB.
mem_kib() {
    awk '/^VmRSS:/ {r = $2} /^VmHWM:/ {h = $2} END {print (r ? r : 0), (h ? h : 0)}' "/proc/$1/status" 2>/dev/null || echo "0 0"
}
# cpu_ticks: bench/lib.sh.
# Nanoseconds on CPU, summed over the process's threads.
cpu_ns() {
    cat "/proc/$1"/task/*/schedstat 2>/dev/null | awk '{ t += $1 } END { printf "%.0f\n", t }'
}
# GET /api/memory, or null (a router without it answers 404).
api_memory() {
    curl -fsS --max-time 2 "http://$ADMIN_ADDR/api/memory" 2>/dev/null || echo null
}
# wsrouter_closes_total by reason, as a JSON object.
closes_json() {
    curl -fsS --max-time 2 "http://$ADMIN_ADDR/metrics" 2>/dev/null | python3 -c '
import json, re, sys
out = {}
for line in sys.stdin:
    m = re.match(r"wsrouter_closes_total\{reason=\"([^\"]+)\"\} (\S+)", line)
    if m:
        out[m.group(1)] = float(m.group(2))
print(json.dumps(out))' 2>/dev/null || echo '{}'
}
# Memory of every TCP socket on the machine (send and receive queues), KiB:
# where bytes wait that the router has not read (TCP backpressure).
tcp_mem_kib() {
    awk -v page="$(getconf PAGESIZE)" '$1 == "TCP:" { for (i = 2; i < NF; i++) if ($i == "mem") print $(i + 1) * page / 1024 }' /proc/net/sockstat 2>/dev/null || echo null
}
# One reading: {"rss_kib", "hwm_kib", "tcp_mem_kib", "api_memory"}.
reading() {
    local rss hwm
    read -r rss hwm <<<"$(mem_kib "$router_pid")"
    printf '{"rss_kib": %s, "hwm_kib": %s, "tcp_mem_kib": %s, "api_memory": %s}' "$rss" "$hwm" "$(tcp_mem_kib)" "$(api_memory)"
}

start_router() {
    local bin=$1 config=$2 tag=$3
    for addr in "$BACKEND_ADDR" "$PROXY_ADDR" "$ADMIN_ADDR"; do
        port_free "$addr" || die "$addr is already in use; stop whatever listens there"
    done
    "$ECHO" --listen "$BACKEND_ADDR" 2>"$out/logs/$tag-backend.log" &
    backend_pid=$!
    RUST_LOG=warn "$bin" --config "$config" 2>"$out/logs/$tag-router.log" &
    router_pid=$!
    probe_url "$URL" || die "the router does not relay WebSocket upgrades (see $out/logs/$tag-*.log)"
    curl -fsS -o /dev/null "http://$ADMIN_ADDR/readyz" || die "the router is not ready"
    sleep 0.3
}

# Wait (at most $2 seconds) for file $1 to be written, while pid $3 lives.
wait_file() {
    local file=$1 limit=$2 pid=$3 i
    for i in $(seq $((limit * 10))); do
        [ -s "$file" ] && return 0
        kill -0 "$pid" 2>/dev/null || return 1
        sleep 0.1
    done
    return 1
}

emit() {  # variant scenario round json-object-fields...
    python3 -c '
import json, sys
v, s, r, extra = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
print(json.dumps({"variant": v, "scenario": s, "round": r, **json.loads(extra)}))' "$@" >>"$RAW"
}

run_cpu() {
    local variant=$1 bin=$2 round=$3 tag="$1-cpu-$3"
    log "$variant / cpu / round $round"
    start_router "$bin" "$BENCH/wsrouter.toml" "$tag"
    local t0 n0 t1 n1 line
    t0=$(cpu_ticks "$router_pid") n0=$(cpu_ns "$router_pid")
    "$LOADGEN" throughput -c 50 --window 16 --size 64 --duration "$cpu_duration" --warmup 1s \
        --url "$URL" --label "$variant" --time-limit 60s \
        >"$out/run/$tag.json" 2>"$out/logs/$tag-loadgen.log" || log "loadgen exited with $?"
    t1=$(cpu_ticks "$router_pid") n1=$(cpu_ns "$router_pid")
    cleanup
    line=$(tail -1 "$out/run/$tag.json")
    [ -n "$line" ] || { log "no result line from loadgen ($tag)"; return 0; }
    emit "$variant" cpu "$round" "$(printf '{"router_cpu_s": %s, "router_cpu_s_schedstat": %s, "loadgen": %s}' \
        "$(awk -v t=$((t1 - t0)) -v h="$CLK_TCK" 'BEGIN {printf "%.3f", t / h}')" \
        "$(awk -v a="$n0" -v b="$n1" 'BEGIN {printf "%.4f", (b - a) / 1e9}')" "$line")"
}

run_idleburst() {
    local variant=$1 bin=$2 round=$3 tag="$1-idleburst-$3"
    log "$variant / idle $sessions + burst $burst_sessions x $burst_messages x $burst_size B / round $round"
    start_router "$bin" "$BENCH/wsrouter.toml" "$tag"
    local r0 ready="$out/run/$tag.ready" bready="$out/run/$tag.burst-ready" ra="null" rb="null" rs="null" bjson="null" t_done
    r0=$(reading)
    rm -f "$ready" "$bready"
    "$LOADGEN" idle -c "$sessions" --duration 150s --time-limit 170s --url "$URL" --ready-file "$ready" \
        >"$out/run/$tag-idle.json" 2>"$out/logs/$tag-loadgen.log" &
    idle_pid=$!
    if wait_file "$ready" 60 "$idle_pid"; then
        sleep 1
        ra=$(reading)
        python3 -c "$CLIENT_PY" burst 127.0.0.1 "${PROXY_ADDR#*:}" /chat "$burst_sessions" "$burst_messages" \
            "$burst_size" "$bready" $((settle + 60)) >"$out/run/$tag-burst.json" 2>"$out/logs/$tag-client.log" &
        client_pid=$!
        if wait_file "$bready" 120 "$client_pid"; then
            t_done=$(date +%s.%N)
            rb=$(reading)
            bjson=$(cat "$bready")
            sleep "$(awk -v t0="$t_done" -v s="$settle" -v now="$(date +%s.%N)" 'BEGIN {d = t0 + s - now; print (d > 0 ? d : 0)}')"
            rs=$(reading)
        else
            log "the burst did not finish within 120 s ($tag)"
        fi
    else
        log "the idle sessions did not open within 60 s ($tag)"
    fi
    local closes opened=""
    closes=$(closes_json)
    cleanup
    [ -s "$ready" ] && opened=$(head -1 "$ready" | tr -dc 0-9)
    emit "$variant" idleburst "$round" "$(printf '{"idle_sessions": %s, "start": %s, "idle": %s, "after_burst": %s, "after_settle": %s, "settle_s": %s, "burst": %s, "closes": %s}' \
        "${opened:-0}" "$r0" "$ra" "$rb" "$rs" "$settle" "$bjson" "$closes")"
}

run_partial() {
    local variant=$1 bin=$2 round=$3 config=$4 scenario=$5 tag="$1-$5-$3"
    log "$variant / $scenario: $partial_sessions x $partial_size B announced / round $round"
    start_router "$bin" "$config" "$tag"
    local r0 ready="$out/run/$tag.ready" rw="null" rw2="null" pjson="null" closes
    r0=$(reading)
    rm -f "$ready"
    python3 -c "$CLIENT_PY" partial 127.0.0.1 "${PROXY_ADDR#*:}" /chat "$partial_sessions" "$partial_size" \
        "$ready" 60 >"$out/run/$tag-client.json" 2>"$out/logs/$tag-client.log" &
    client_pid=$!
    if wait_file "$ready" 90 "$client_pid"; then
        sleep 2
        rw=$(reading)
        sleep 3
        rw2=$(reading)
    else
        log "the partial sessions did not finish sending within 90 s ($tag)"
    fi
    closes=$(closes_json)
    stop_pid "$client_pid"; client_pid=""
    [ -s "$out/run/$tag-client.json" ] && pjson=$(tail -1 "$out/run/$tag-client.json")
    cleanup
    emit "$variant" "$scenario" "$round" "$(printf '{"start": %s, "waiting": %s, "waiting_later": %s, "client": %s, "closes": %s}' \
        "$r0" "$rw" "$rw2" "$pjson" "$closes")"
}

# --- rounds: the order of the two binaries flips every round -----------------

for round in $(seq "$runs"); do
    if [ $((round % 2)) = 1 ]; then order="before after"; else order="after before"; fi
    for which in $order; do
        if [ "$which" = before ]; then run_cpu "$label_before" "$before_bin" "$round"
        else run_cpu "$label_after" "$after_bin" "$round"; fi
    done
    for which in $order; do
        if [ "$which" = before ]; then
            run_idleburst "$label_before" "$before_bin" "$round"
            run_partial "$label_before" "$before_bin" "$round" "$BENCH/wsrouter.toml" partial
        else
            run_idleburst "$label_after" "$after_bin" "$round"
            run_partial "$label_after" "$after_bin" "$round" "$BENCH/wsrouter.toml" partial
            run_partial "$label_after" "$after_bin" "$round" "$LIMIT_CONFIG" partial-limit
        fi
    done
done

echo "load at end: $(cut -d' ' -f1-3 /proc/loadavg); cpu pressure: $(head -1 /proc/pressure/cpu 2>/dev/null || echo n/a)" >>"$out/versions.txt"

# Keep the folder small: per-run files are summarised in raw.jsonl.
find "$out/logs" -type f -size +1M -print -delete | sed 's/^/[memory] deleted (over 1 MB): /' >&2 || true
rm -rf "$out/run"

# --- summary ---------------------------------------------------------------

python3 - "$RAW" "$label_before" "$label_after" "$limit_bytes" >"$out/summary.md" <<'PY'
import json, statistics, sys
raw, B, A, limit = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
rows = [json.loads(l) for l in open(raw) if l.strip()]

def med(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None

def get(row, *path):
    for p in path:
        if not isinstance(row, dict) or row.get(p) is None:
            return None
        row = row[p]
    return row

def runs(v, s):
    return [r for r in rows if r["variant"] == v and r["scenario"] == s]

def mib(kib):
    return None if kib is None else kib / 1024

def fmt(x, d=1):
    return "–" if x is None else f"{x:,.{d}f}"

def ratio(a, b):
    return "–" if a is None or b in (None, 0) else f"{a / b:.2f}"

def all_runs(xs, d=1):
    return ", ".join(fmt(x, d) for x in xs)

print("# Memory bounds: before / after\n")
print("Medians over the rounds (the order of the two binaries flips every round); every")
print("scenario on a fresh router and echo backend. RSS = the router's VmRSS.\n")
print("| figure | %s | %s | %s / %s | runs (%s; %s) |" % (B, A, A, B, B, A))
print("| --- | ---: | ---: | ---: | --- |")

def line(name, scen, f, d=1):
    xb = [f(r) for r in runs(B, scen)]
    xa = [f(r) for r in runs(A, scen)]
    mb, ma = med(xb), med(xa)
    print(f"| {name} | {fmt(mb, d)} | {fmt(ma, d)} | {ratio(ma, mb)} | {all_runs(xb, d)}; {all_runs(xa, d)} |")

rss = lambda *p: (lambda r: mib(get(r, *p, "rss_kib")))
line("router RSS at start, MiB", "idleburst", rss("start"))
line("(a) RSS with the idle sessions open, MiB", "idleburst", rss("idle"))
line("(a) RSS per idle session, KiB", "idleburst",
     lambda r: None if get(r, "idle", "rss_kib") is None or not r.get("idle_sessions") else
     (r["idle"]["rss_kib"] - r["start"]["rss_kib"]) / r["idle_sessions"], 2)
line("(b) RSS right after the burst, MiB", "idleburst", rss("after_burst"))
line("(b) RSS peak during the burst (VmHWM), MiB", "idleburst", lambda r: mib(get(r, "after_burst", "hwm_kib")))
line("(b) RSS after the settle, idle, MiB", "idleburst", rss("after_settle"))
line("(b) burst, MiB echoed per second", "idleburst", lambda r: get(r, "burst", "mib_echoed_per_s"))
line("(c) RSS while the partial messages wait, MiB", "partial", rss("waiting"))
line("(c) RSS 3 s later, MiB", "partial", rss("waiting_later"))
line("(c) payload sent by the clients, MiB", "partial", lambda r: get(r, "client", "payload_mib_sent"))
line("(c) kernel TCP buffers, whole machine, MiB", "partial", lambda r: mib(get(r, "waiting", "tcp_mem_kib")))

print()
print("Burst echoes (all runs): " + "; ".join(
    f"{v}: {sum(get(r, 'burst', 'echoes') or 0 for r in runs(v, 'idleburst'))} good, "
    f"{sum(get(r, 'burst', 'bad_echoes') or 0 for r in runs(v, 'idleburst'))} bad, "
    f"{sum(len(get(r, 'burst', 'errors') or []) for r in runs(v, 'idleburst'))} errors"
    for v in (B, A)))
print()
print(f"{A}'s GET /api/memory (medians, MiB): " + "; ".join(
    f"{label} held {fmt(med([mib((get(r, *p, 'api_memory', 'held_bytes') or 0) / 1024) for r in runs(A, s)]))}"
    f" peak {fmt(med([mib((get(r, *p, 'api_memory', 'peak_bytes') or 0) / 1024) for r in runs(A, s)]))}"
    for label, s, p in [("(a)", "idleburst", ("idle",)), ("(b) after the burst", "idleburst", ("after_burst",)),
                        ("(b) after the settle", "idleburst", ("after_settle",)),
                        ("(c)", "partial", ("waiting",))]))

lim = runs(A, "partial-limit")
if lim:
    print(f"\n## {A} with [limits] max_buffered_bytes = {limit} ({limit / 1048576:.0f} MiB), partial messages\n")
    print("| round | RSS waiting, MiB | RSS 3 s later, MiB | VmHWM, MiB | kernel TCP buffers, MiB | held_bytes | peak_bytes | limit_bytes | pressure | payload sent, MiB | fully sent | closed by the router (client's view) | closes by reason (router) |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: | ---: | --- | --- |")
    for r in lim:
        am = get(r, "waiting", "api_memory") or {}
        print(f"| {r['round']} | {fmt(mib(get(r, 'waiting', 'rss_kib')))} | {fmt(mib(get(r, 'waiting_later', 'rss_kib')))} | "
              f"{fmt(mib(get(r, 'waiting', 'hwm_kib')))} | {fmt(mib(get(r, 'waiting', 'tcp_mem_kib')))} | {am.get('held_bytes', '–'):,} | {am.get('peak_bytes', '–'):,} | "
              f"{am.get('limit_bytes', '–'):,} | {am.get('pressure', '–')} | {fmt(get(r, 'client', 'payload_mib_sent'))} | "
              f"{get(r, 'client', 'fully_sent')} | {json.dumps(get(r, 'client', 'closed_by_router_at_end'))} | {json.dumps(r.get('closes'))} |")
    print(f"\nMedian RSS waiting: {fmt(med([mib(get(r, 'waiting', 'rss_kib')) for r in lim]))} MiB "
          f"(default budget, same binary: {fmt(med([mib(get(r, 'waiting', 'rss_kib')) for r in runs(A, 'partial')]))} MiB)")

print("\n## Router CPU per relayed 64 B message (throughput: 50 connections, window 16)\n")
def cpu_per_m(key):
    return lambda r: None if not get(r, "loadgen", "messages", "received") else \
        r[key] / (2 * r["loadgen"]["messages"]["received"]) * 1e6
print("| figure | %s | %s | %s / %s | runs (%s; %s) |" % (B, A, A, B, B, A))
print("| --- | ---: | ---: | ---: | --- |")
line("router CPU seconds per million relayed messages (/proc/PID/stat)", "cpu", cpu_per_m("router_cpu_s"), 3)
line("the same from schedstat (exact)", "cpu", cpu_per_m("router_cpu_s_schedstat"), 3)
line("64 B messages relayed per router CPU-second", "cpu",
     lambda r: None if not r["router_cpu_s"] else 2 * get(r, "loadgen", "messages", "received") / r["router_cpu_s"], 0)
line("round trips per second", "cpu", lambda r: get(r, "loadgen", "rates", "messages_per_s"), 0)
line("router CPU seconds in the run", "cpu", lambda r: r["router_cpu_s"], 2)
errs = {v: sum(get(r, "loadgen", "error_total") or 0 for r in runs(v, "cpu")) for v in (B, A)}
print(f"\nLoad generator errors, all CPU runs: {B} {errs[B]}, {A} {errs[A]}")
PY

cat "$out/versions.txt" >&2
cat "$out/summary.md"
log "raw results: $RAW; summary: $out/summary.md"
