#!/usr/bin/env python3
# Per-echo instructions by function: b297cf3 and c1faf7b (this folder) next to
# aa4f493 (the previous section's callgrind run, sample-read-watermark-cpu).
import json, re, subprocess
def load(cg, lg):
    n = json.load(open(lg))["messages"]["received"]
    out = subprocess.run(["callgrind_annotate", "--inclusive=no", "--threshold=100", cg],
                         capture_output=True, text=True).stdout
    f = {}
    for line in out.splitlines():
        m = re.match(r"\s*([\d,]+) \([^)]*\)\s+(.*?)(?: \[[^\]]*\])?$", line)
        if m:
            f[m.group(2)] = f.get(m.group(2), 0) + int(m.group(1).replace(",", "")) / n
    return f
old = "../../sample-read-watermark-cpu/callgrind"
b = load("cg-before.out", "loadgen-before.json")
w = load(f"{old}/cg-after.out", f"{old}/loadgen-after.json")
a = load("cg-after.out", "loadgen-after.json")
print("# instructions per echo: b297cf3 (this run), aa4f493 (previous section's run), c1faf7b (this run); c1faf7b - aa4f493, c1faf7b - b297cf3")
keys = sorted(set(a) | set(b) | set(w), key=lambda k: -max(abs(a.get(k,0)-b.get(k,0)), abs(a.get(k,0)-w.get(k,0))))
keys = ["PROGRAM TOTALS"] + [k for k in keys if k != "PROGRAM TOTALS"]
print(f"{'b297cf3':>8} {'aa4f493':>8} {'c1faf7b':>8} {'c1-aa':>7} {'c1-b2':>7}  function")
for k in keys[:30]:
    x, y, z = b.get(k,0), w.get(k,0), a.get(k,0)
    print(f"{x:8.1f} {y:8.1f} {z:8.1f} {z-y:+7.1f} {z-x:+7.1f}  {k}")
