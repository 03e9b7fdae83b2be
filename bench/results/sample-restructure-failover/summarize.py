#!/usr/bin/env python3
# Per-run figures and medians of the failover runs, BEFORE (e16eb32) and AFTER
# (de0f219) router binaries (raw.jsonl written by alternate.sh), in run order.
#   python3 summarize.py [raw.jsonl]
# Both invocations (second/ renumbered as rounds 3-4):
#   { cat raw.jsonl; jq -c ".round += 2" second/raw.jsonl; } > raw-all.jsonl; python3 summarize.py raw-all.jsonl > summary-all.md
import json, statistics as st, sys
rows = [json.loads(l) for l in open(sys.argv[1] if len(sys.argv) > 1 else "raw.jsonl")]
H = 'wsrouter_migration_duration_seconds_bucket{le="%s"}'
M = lambda r: r["router_metrics"]
figs = [
 ("client disconnects", lambda r: r["client_disconnects"], 0),
 ("sessions not recovered", lambda r: r["not_recovered"], 0),
 ("lost messages", lambda r: r["lost_messages"], 0),
 ("duplicated messages", lambda r: r["duplicated_messages"], 0),
 ("max duplicated per session", lambda r: r["loadgen"]["failover"]["messages"]["max_duplicated_per_session"], 0),
 ("reordered", lambda r: r["reordered_messages"], 0),
 ("router closes (metric, all reasons)", lambda r: sum(v for k, v in M(r).items() if k.startswith("wsrouter_closes_total")), 0),
 ("moves a -> b, upstream_lost (metric)", lambda r: M(r).get('wsrouter_migrations_total{from="a",to="b",reason="upstream_lost"}', 0), 0),
 ("replayed, unread (metric)", lambda r: M(r).get('wsrouter_replayed_messages_total{kind="unread"}', 0), 0),
 ("replayed, margin (metric)", lambda r: M(r).get('wsrouter_replayed_messages_total{kind="margin"}', 0), 0),
 ("move time, mean (metric sum / count), ms", lambda r: 1000 * M(r)["wsrouter_migration_duration_seconds_sum"] / M(r)["wsrouter_migration_duration_seconds_count"], 0),
 ("moves done within 250 ms", lambda r: M(r)[H % "0.25"], 0),
 ("moves done within 500 ms", lambda r: M(r)[H % "0.5"], 0),
 ("moves done within 1 s", lambda r: M(r)[H % "1"], 0),
 ("relaying again p50, ms", lambda r: r["relaying_again_ms"]["p50"], 0),
 ("relaying again p99, ms", lambda r: r["relaying_again_ms"]["p99"], 0),
 ("relaying again max, ms", lambda r: r["relaying_again_ms"]["max"], 0),
 ("sessions relaying again within 2 s", lambda r: r["recovered_within_2s"], 0),
 ("router CPU before the kill, % of a core", lambda r: r["router_cpu_pct_before_kill"], 1),
 ("router CPU peak, %", lambda r: r["router_cpu_pct_peak"], 1),
 ("router CPU-seconds in the failover window", lambda r: r["router_cpu_s_failover"], 2),
 ("machine busy before the kill, %", lambda r: r["machine_busy_pct_before_kill"], 0),
 ("machine busy in the failover window, %", lambda r: r["machine_busy_pct_failover"], 0),
 ("router run-queue wait in the failover, %", lambda r: r["router_runqueue_wait_pct_failover"], 0),
 ("router RSS before the kill, MiB", lambda r: r["router_rss_mib_before_kill"], 1),
 ("router RSS peak, MiB", lambda r: r["router_rss_mib_peak"], 1),
]
def by(v): return sorted((r for r in rows if r["variant"] == v), key=lambda r: r["round"])
B, A = by("before"), by("after")
order = ", ".join("r%d %s" % (r["round"], r["variant"]) for r in rows)
print(f"Runs in order: {order}; {rows[0]['sessions']} sessions each.\n")
print("| figure | before (e16eb32), median | after (de0f219), median | after / before | before runs, by round | after runs, by round |")
print("| --- | ---: | ---: | ---: | --- | --- |")
for name, f, d in figs:
    b = [f(r) for r in B]; a = [f(r) for r in A]
    mb, ma = st.median(b), st.median(a)
    ratio = f"{ma/mb:.2f}" if mb else "-"
    fmt = lambda x: f"{x:,.{d}f}"
    print(f"| {name} | {fmt(mb)} | {fmt(ma)} | {ratio} | {', '.join(map(fmt, b))} | {', '.join(map(fmt, a))} |")
print("\nrouter warnings per run:")
for r in rows:
    print(f"  r{r['round']} {r['variant']}: {json.dumps(r['router_warnings'])}; backends after: {json.dumps(r['backends_after'])}")
print("\nload average before -> after each run; CPU pressure some avg60 before:")
for r in rows:
    print(f"  r{r['round']} {r['variant']}: {r['load_before_run']} -> {r['load_after_run']}; {r['cpu_psi_avg60_before']} %")
