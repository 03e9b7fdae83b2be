#!/usr/bin/env python3
# Per-echo user-space instructions by function for each variant, from the
# callgrind outputs and the loadgen echo counts (received) of run.sh; from
# sample-read-watermark-fix-cpu/callgrind/per_echo.py, for any number of variants
# (rows sorted by the change between the last two).
#   per_echo.py DIR chat socketio   (copied from sample-restructure-cpu/callgrind)
import json, re, subprocess, sys
d, vs = sys.argv[1], sys.argv[2:]
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
data = {v: load(v) for v in vs}
print("# user-space instructions per echoed message, callgrind, one run each "
      "(throughput -c 50 --window 16 --size 64 --duration 8s)")
print("# echoes: " + ", ".join(f"{v} {data[v][0]:,}" for v in vs))
print(f"# delta({vs[-1]} - {vs[-2]}) " + " ".join(vs) + " function")
a, b = data[vs[-1]][1], data[vs[-2]][1]
keys = set().union(*(data[v][1] for v in vs))
keys = sorted(keys, key=lambda k: -abs(a.get(k, 0) - b.get(k, 0)))
keys = ["PROGRAM TOTALS"] + [k for k in keys if k != "PROGRAM TOTALS"]
for k in keys[:40]:
    print(f"{a.get(k,0)-b.get(k,0):+7.1f} " + " ".join(f"{data[v][1].get(k,0):7.1f}" for v in vs) + f" {k}")
