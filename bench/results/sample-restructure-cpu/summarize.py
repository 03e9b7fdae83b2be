#!/usr/bin/env python3
# Medians per binary, ratio of medians, median of the same-round ratios (and how
# many are above 1), per-round ratios, and the load average, from raw.jsonl
# (written by alternate.sh).   python3 summarize.py [raw.jsonl [BEFORE_LABEL AFTER_LABEL]]
import json, statistics as st, sys
rows = [json.loads(l) for l in open(sys.argv[1] if len(sys.argv) > 1 else "raw.jsonl")]
def val(r, k):
    res = r["result"]; m = res["messages"]["received"]
    return {"us_per_relayed": lambda: 1e6 * r["proxy_cpu_s"] / (2 * m),
            "cpu_s": lambda: r["proxy_cpu_s"], "backend_cpu_s": lambda: r["backend_cpu_s"],
            "rt_per_s": lambda: res["rates"]["messages_per_s"],
            "errors": lambda: res["error_total"],
            "p50": lambda: res["latency_us"]["p50"] / 1000, "p99": lambda: res["latency_us"]["p99"] / 1000,
            "p99_9": lambda: res["latency_us"]["p99_9"] / 1000}[k]()
figs = [("throughput", "us_per_relayed", "throughput: router CPU µs per relayed 64 B message", 3),
        ("throughput", "rt_per_s", "throughput: round trips per second", 0),
        ("throughput", "backend_cpu_s", "throughput: echo backend CPU seconds", 2),
        ("latency", "cpu_s", "latency: router CPU seconds (100 x 100/s, 10 s)", 3),
        ("latency", "us_per_relayed", "latency: router CPU µs per relayed message", 2),
        ("latency", "backend_cpu_s", "latency: echo backend CPU seconds", 3),
        ("latency", "p50", "latency: p50 round trip, ms", 3),
        ("latency", "p99", "latency: p99 round trip, ms", 3),
        ("latency", "p99_9", "latency: p99.9 round trip, ms", 3)]
lb, la = (sys.argv[2], sys.argv[3]) if len(sys.argv) > 3 else ("e16eb32", "de0f219")
print(f"| figure | rounds | before ({lb}) | after ({la}) | after / before (medians) | median of same-round ratios | above 1 | per-round ratios |")
print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |")
for w, k, name, d in figs:
    sel = lambda v: {r["round"]: val(r, k) for r in rows if r["variant"] == v and r["workload"] == w}
    b, a = sel("before"), sel("after")
    if not b or not a: continue
    rs = sorted(i for i in b if i in a)
    ratios = [a[i] / b[i] for i in rs]
    mb, ma = st.median(b.values()), st.median(a.values())
    print(f"| {name} | {len(rs)} | {mb:,.{d}f} | {ma:,.{d}f} | {ma/mb:.3f} | {st.median(ratios):.3f} | "
          f"{sum(x > 1 for x in ratios)} of {len(ratios)} | {', '.join(f'{x:.2f}' for x in ratios)} |")
errs = {v: sum(val(r, "errors") for r in rows if r["variant"] == v) for v in ("before", "after")}
print(f"\nload generator errors: {errs}")
seen = {}
for r in rows:
    seen.setdefault((r["round"], r["variant"]), r)
l1 = [float(r.get("load_before_run", r["load_after_run"]).split()[0]) for r in seen.values()] + \
     [float(r["load_after_run"].split()[0]) for r in seen.values()]
print(f"load average (1 min) before/after each compare.sh: {min(l1):.2f}-{max(l1):.2f}")
psi = [float(r["cpu_psi_avg60_before"]) for r in seen.values() if r.get("cpu_psi_avg60_before")]
if psi: print(f"CPU pressure some avg60 before each compare.sh: {min(psi):.1f}-{max(psi):.1f} %")
print("\nround, variant, load before -> after:")
for (rd, v), r in sorted(seen.items()):
    print(f"  r{rd} {v}: {r.get('load_before_run','?')} -> {r['load_after_run']}")
