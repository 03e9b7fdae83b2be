#!/usr/bin/env python3
# Medians of the failover runs, plain and --ack (raw.jsonl written by alternate.sh).
import json, statistics as st, sys
rows = [json.loads(l) for l in open(sys.argv[1] if len(sys.argv) > 1 else "raw.jsonl")]
H = 'wsrouter_migration_duration_seconds_bucket{le="%s"}'
figs = [
 ("relaying again p50, ms", lambda r: r["relaying_again_ms"]["p50"], 0),
 ("relaying again p99, ms", lambda r: r["relaying_again_ms"]["p99"], 0),
 ("relaying again max, ms", lambda r: r["relaying_again_ms"]["max"], 0),
 ("relaying again min, ms", lambda r: r["relaying_again_ms"]["min"], 0),
 ("sessions relaying again within 2 s", lambda r: r["recovered_within_2s"], 0),
 ("first post-kill round trip p50, ms", lambda r: r["first_echo_round_trip_ms"]["p50"], 0),
 ("client disconnects", lambda r: r["client_disconnects"], 0),
 ("lost messages", lambda r: r["lost_messages"], 0),
 ("duplicated messages", lambda r: r["duplicated_messages"], 0),
 ("max duplicated per session", lambda r: r["loadgen"]["failover"]["messages"]["max_duplicated_per_session"], 0),
 ("reordered", lambda r: r["reordered_messages"], 0),
 ("replayed, unread (router metric)", lambda r: r["router_metrics"].get('wsrouter_replayed_messages_total{kind="unread"}', 0), 0),
 ("replayed, margin (router metric)", lambda r: r["router_metrics"].get('wsrouter_replayed_messages_total{kind="margin"}', 0), 0),
 ("replayed, unacknowledged (router metric)", lambda r: r["router_metrics"].get('wsrouter_replayed_messages_total{kind="unacknowledged"}', 0), 0),
 ("moves (router metric)", lambda r: r["router_metrics"]["wsrouter_migration_duration_seconds_count"], 0),
 ("moves done within 250 ms", lambda r: r["router_metrics"][H % "0.25"], 0),
 ("moves done within 500 ms", lambda r: r["router_metrics"][H % "0.5"], 0),
 ("moves done within 1 s", lambda r: r["router_metrics"][H % "1"], 0),
 ("router CPU before the kill, % of a core", lambda r: r["router_cpu_pct_before_kill"], 1),
 ("router CPU peak, %", lambda r: r["router_cpu_pct_peak"], 1),
 ("router CPU-seconds in the failover window", lambda r: r["router_cpu_s_failover"], 2),
 ("machine busy before the kill / in the failover, %", lambda r: None, 0),
 ("router run-queue wait in the failover, %", lambda r: r["router_runqueue_wait_pct_failover"], 0),
 ("router RSS before the kill, MiB", lambda r: r["router_rss_mib_before_kill"], 1),
 ("router RSS peak, MiB", lambda r: r["router_rss_mib_peak"], 1),
]
def by(v): return sorted((r for r in rows if r["variant"] == v), key=lambda r: r["round"])
print("| figure | plain, median | --ack, median | ack / plain | plain runs | --ack runs |")
print("| --- | ---: | ---: | ---: | --- | --- |")
for name, f, d in figs:
    if name.startswith("machine busy"):
        for v in ("before", "after"): pass
        b = [f"{r['machine_busy_pct_before_kill']:.0f} / {r['machine_busy_pct_failover']:.0f}" for r in by("plain")]
        a = [f"{r['machine_busy_pct_before_kill']:.0f} / {r['machine_busy_pct_failover']:.0f}" for r in by("ack")]
        print(f"| {name} | | | | {', '.join(b)} | {', '.join(a)} |"); continue
    b = [f(r) for r in by("plain")]; a = [f(r) for r in by("ack")]
    mb, ma = st.median(b), st.median(a)
    ratio = f"{ma/mb:.2f}" if mb else "-"
    fmt = lambda x: f"{x:,.{d}f}"
    print(f"| {name} | {fmt(mb)} | {fmt(ma)} | {ratio} | {', '.join(map(fmt,b))} | {', '.join(map(fmt,a))} |")
