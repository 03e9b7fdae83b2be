#!/usr/bin/env python3
# From a router log at RUST_LOG=wsrouter=debug: the spread of "moving
# session" lines (detection) after the first one, and "session moved" elapsed.
import re, sys, datetime as dt
def ts(l): return dt.datetime.fromisoformat(l[:26].rstrip("Z"))
def ms(s):
    m = re.match(r"([0-9.]+)(ms|µs|ns|s)", s); v = float(m[1])
    return v * {"ms": 1, "µs": 1e-3, "ns": 1e-6, "s": 1e3}[m[2]]
esc = re.compile(r"\x1b\[[0-9;]*m")
moving, moved = [], []
for l in open(sys.argv[1], errors="replace"):
    l = esc.sub("", l)
    if "moving session" in l: moving.append(ts(l))
    elif "session moved" in l:
        m = re.search(r"elapsed=(\S+)", l); moved.append((ts(l), ms(m[1])))
t0 = moving[0]
def q(v, p): v = sorted(v); return v[min(len(v) - 1, int(p * len(v)))]
d = [(t - t0).total_seconds() * 1000 for t in moving]
e = [x for _, x in moved]
f = [(t - t0).total_seconds() * 1000 for t, _ in moved]
print(f"moves started {len(d)}: after the first, p50 {q(d,.5):.0f} p90 {q(d,.9):.0f} last {max(d):.0f} ms")
print(f"move elapsed (histogram's figure) min {min(e):.0f} p50 {q(e,.5):.0f} p90 {q(e,.9):.0f} max {max(e):.0f} ms")
print(f"moves done, after the first start: first {min(f):.0f} p50 {q(f,.5):.0f} last {max(f):.0f} ms")
