#!/usr/bin/env python3
# Both invocations together (raw.jsonl: 6 rounds, second/raw.jsonl: 4 rounds):
# medians per binary, ratio of medians, and the median of the same-round ratios.
import json, statistics as st
rows = [dict(json.loads(l), inv=1) for l in open("raw.jsonl")] + \
       [dict(json.loads(l), inv=2) for l in open("second/raw.jsonl")]
def val(r, k):
    res = r["result"]; m = res["messages"]["received"]
    return {"us_per_relayed": lambda: 1e6 * r["proxy_cpu_s"] / (2 * m),
            "cpu_s": lambda: r["proxy_cpu_s"], "backend_cpu_s": lambda: r["backend_cpu_s"],
            "rt_per_s": lambda: res["rates"]["messages_per_s"],
            "p50": lambda: res["latency_us"]["p50"] / 1000, "p99": lambda: res["latency_us"]["p99"] / 1000,
            "p99_9": lambda: res["latency_us"]["p99_9"] / 1000}[k]()
figs = [("throughput", "us_per_relayed", "throughput: router CPU µs per relayed 64 B message", 3),
        ("throughput", "rt_per_s", "throughput: round trips per second", 0),
        ("throughput", "backend_cpu_s", "throughput: echo backend CPU seconds", 2),
        ("latency", "cpu_s", "latency: router CPU seconds (100 x 100/s, 10 s)", 2),
        ("latency", "backend_cpu_s", "latency: echo backend CPU seconds", 2),
        ("latency", "p50", "latency: p50 round trip, ms", 3),
        ("latency", "p99", "latency: p99 round trip, ms", 3),
        ("latency", "p99_9", "latency: p99.9 round trip, ms", 3)]
print("| figure | before (b297cf3) | after (c1faf7b) | after / before (medians) | median of same-round ratios | same-round ratios above 1 |")
print("| --- | ---: | ---: | ---: | ---: | ---: |")
for w, k, name, d in figs:
    sel = lambda v: {(r["inv"], r["round"]): val(r, k) for r in rows if r["variant"] == v and r["workload"] == w}
    b, a = sel("before"), sel("after")
    ratios = [a[i] / b[i] for i in sorted(b) if i in a]
    mb, ma = st.median(b.values()), st.median(a.values())
    print(f"| {name} | {mb:,.{d}f} | {ma:,.{d}f} | {ma/mb:.3f} | {st.median(ratios):.3f} | {sum(x > 1 for x in ratios)} of {len(ratios)} |")
