#!/usr/bin/env python3
# Per-echo user-space instructions by function, before vs after, from the
# callgrind outputs and the loadgen echo counts (received) of run.sh.
#   per_echo.py DIR
import json, re, subprocess, sys
d = sys.argv[1] if len(sys.argv) > 1 else "."
def load(v):
    n = json.load(open(f"{d}/loadgen-{v}.json"))["messages"]["received"]
    out = subprocess.run(["callgrind_annotate", "--inclusive=no", "--threshold=100", f"{d}/cg-{v}.out"],
                         capture_output=True, text=True).stdout
    f = {}
    for line in out.splitlines():
        m = re.match(r"\s*([\d,]+) \([^)]*\)\s+(.*?)(?: \[[^\]]*\])?$", line)
        if m:
            f[m.group(2)] = f.get(m.group(2), 0) + int(m.group(1).replace(",", "")) / n
    return n, f
nb, b = load("before"); na, a = load("after")
print(f"# user-space instructions per echoed message, callgrind, one run each "
      f"(throughput -c 50 --window 16 --size 64 --duration 8s)")
print(f"# echoes: before {nb:,}, after {na:,} (loadgen-*.json); delta before after function")
keys = sorted(set(a) | set(b), key=lambda k: -abs(a.get(k, 0) - b.get(k, 0)))
keys = ["PROGRAM TOTALS"] + [k for k in keys if k != "PROGRAM TOTALS"]
for k in keys[:30]:
    print(f"{a.get(k,0)-b.get(k,0):+7.1f} {b.get(k,0):7.1f} {a.get(k,0):7.1f} {k}")
