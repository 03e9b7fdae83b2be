#!/usr/bin/env python3
# Medians and after/before ratios from raw.jsonl (written by alternate.sh).
import json, statistics as st, sys
rows = [json.loads(l) for l in open(sys.argv[1] if len(sys.argv) > 1 else "raw.jsonl")]
def val(r, k):
    res = r["result"]; m = res["messages"]["received"]
    if k == "us_per_relayed": return 1e6 * r["proxy_cpu_s"] / (2 * m)
    if k == "relayed_per_cpu_s": return 2 * m / r["proxy_cpu_s"]
    if k == "cpu_s": return r["proxy_cpu_s"]
    if k == "rt_per_s": return res["rates"]["messages_per_s"]
    if k in ("p50", "p99", "p99_9"): return res["latency_us"][k] / 1000
    if k == "errors": return res["error_total"]
    if k == "backend_cpu_s": return r["backend_cpu_s"]
figs = [("throughput", "relayed_per_cpu_s", "64 B messages relayed per router CPU-second", 0),
        ("throughput", "us_per_relayed", "router CPU µs per relayed message", 3),
        ("throughput", "cpu_s", "router CPU seconds in the run", 2),
        ("throughput", "rt_per_s", "round trips per second", 0),
        ("throughput", "backend_cpu_s", "echo backend CPU seconds", 2),
        ("latency", "cpu_s", "router CPU seconds (latency, 100 x 100/s)", 2),
        ("latency", "us_per_relayed", "router CPU µs per relayed message (latency)", 2),
        ("latency", "backend_cpu_s", "echo backend CPU seconds (latency)", 2),
        ("latency", "p50", "p50 round trip, ms", 3),
        ("latency", "p99", "p99 round trip, ms", 3),
        ("latency", "p99_9", "p99.9 round trip, ms", 3)]
rounds = sorted({r["round"] for r in rows})
print("| figure | before (b297cf3) | after (c1faf7b) | after / before | per-round ratios |")
print("| --- | ---: | ---: | ---: | --- |")
for w, k, name, d in figs:
    b = {r["round"]: val(r, k) for r in rows if r["variant"] == "before" and r["workload"] == w}
    a = {r["round"]: val(r, k) for r in rows if r["variant"] == "after" and r["workload"] == w}
    mb, ma = st.median(b.values()), st.median(a.values())
    per = ", ".join(f"{a[i]/b[i]:.2f}" for i in rounds if i in a and i in b and b[i])
    print(f"| {name} | {mb:,.{d}f} | {ma:,.{d}f} | {ma/mb:.3f} | {per} |")
errs = {v: sum(val(r, "errors") for r in rows if r["variant"] == v) for v in ("before", "after")}
print(f"\nload generator errors: {errs}; runs: " + ", ".join(f"{v} {sum(1 for r in rows if r['variant']==v)}" for v in ("before","after")))
