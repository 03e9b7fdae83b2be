#!/usr/bin/env python3
# Summary of alternate.sh's invocations: router CPU µs per relayed 64 B message
# (proxy_cpu_s / (2 x received)), per binary and path; socketio / chat per
# binary (same round of one invocation); after / before per path (round n of
# an invocation against round n of its neighbour: 1-2, 3-4, ...).
#   summarize.py OUTDIR [OUTDIR...]   (several: pooled; pairs stay within a folder)
import json, os, re, statistics as st, sys
dirs = sys.argv[1:]
inv = []
for k, d in enumerate(dirs):
    found = []
    for n in os.listdir(d):
        m = re.fullmatch(r"(\d+)-(before|after)", n)
        if m:
            found.append((int(m.group(1)), m.group(2), os.path.join(d, n)))
    for i, v, p in sorted(found):
        label = os.path.basename(os.path.abspath(d))
        label = "first" if label == "sample-socketio-connects" else label
        name = f"{label}/{i}" if len(dirs) > 1 else str(i)
        inv.append((name, v, p, k))
def rows(p):
    out = {}
    for l in open(os.path.join(p, "raw.jsonl")):
        r = json.loads(l)
        rec = r["result"]["messages"]["received"]
        out[(r["round"], r["variant"])] = dict(
            us=1e6 * r["proxy_cpu_s"] / (2 * rec), rate=r["result"]["rates"]["messages_per_s"],
            bcpu=r["backend_cpu_s"], load=r["load"]["load1"], psi=r["load"]["cpu_some_avg10"],
            builds=r["load"]["builds"], errors=r["result"].get("error_total", 0), position=r["position"])
    return out
data = [(i, v, rows(p)) for i, v, p, _ in inv]
group = [k for *_, k in inv]
def fmtr(xs):
    return f"{st.median(xs):.3f} ({min(xs):.3f}-{max(xs):.3f}, {sum(x > 1 for x in xs)} of {len(xs)} above 1)"
print("# Socket.IO CONNECTs noted in the relay: router CPU µs per relayed 64 B message\n")
print("Invocations: " + ", ".join(f"{i}-{v}" for i, v, _ in data) + "\n")
print("## Per binary and path (all rounds of all invocations)\n")
print("| binary | rounds | /chat µs/msg (median) | /socket.io/ µs/msg (median) | socketio / chat (medians) | same-round socketio / chat: median (range) | round trips/s chat / socketio (medians) |")
print("| --- | ---: | ---: | ---: | ---: | --- | --- |")
med = {}
for b in ("before", "after"):
    rs = [r for i, v, r in data if v == b]
    c = [x[(n, "chat")]["us"] for x in rs for n in {k[0] for k in x} if (n, "chat") in x]
    s = [x[(n, "socketio")]["us"] for x in rs for n in {k[0] for k in x} if (n, "socketio") in x]
    ratios = [x[(n, "socketio")]["us"] / x[(n, "chat")]["us"] for x in rs for n in {k[0] for k in x}
              if (n, "chat") in x and (n, "socketio") in x]
    rc = [x[k]["rate"] for x in rs for k in x if k[1] == "chat"]
    rsio = [x[k]["rate"] for x in rs for k in x if k[1] == "socketio"]
    med[b] = (st.median(c), st.median(s))
    print(f"| {b} | {len(ratios)} | {st.median(c):.3f} | {st.median(s):.3f} | {st.median(s)/st.median(c):.3f} | {fmtr(ratios)} | {st.median(rc):,.0f} / {st.median(rsio):,.0f} |")
print("\n## After / before per path (round n of neighbouring invocations)\n")
print("| path | after / before (medians) | paired after / before: median (range) |")
print("| --- | ---: | --- |")
for k, p in ((0, "chat"), (1, "socketio")):
    pairs = []
    for j in range(0, len(data) - 1, 2):
        (i1, v1, r1), (i2, v2, r2) = data[j], data[j + 1]
        assert group[j] == group[j + 1] and {v1, v2} == {"before", "after"}
        a, b = (r1, r2) if v1 == "after" else (r2, r1)
        for n in sorted({x[0] for x in a}):
            if (n, p) in a and (n, p) in b:
                pairs.append(a[(n, p)]["us"] / b[(n, p)]["us"])
    print(f"| /{p if p == 'chat' else 'socket.io/'} | {med['after'][k]/med['before'][k]:.3f} | {fmtr(pairs)} |")
def mse(xs):
    m = st.mean(xs)
    return f"mean {m:.3f} ± {st.stdev(xs) / len(xs) ** 0.5:.3f} (s.e.), sd {st.stdev(xs):.3f}"
print("\n## The change's Socket.IO-only part: (after socketio/chat) / (before socketio/chat)\n")
print("Per paired round: each binary's socketio/chat of one round (two adjacent runs), after's over before's.\n")
print("| rounds | median (range) | mean |")
print("| --- | --- | --- |")
dd, quiet = [], []
for j in range(0, len(data) - 1, 2):
    (i1, v1, r1), (i2, v2, r2) = data[j], data[j + 1]
    a, b = (r1, r2) if v1 == "after" else (r2, r1)
    for n in sorted({x[0] for x in a}):
        ks = [(n, "chat"), (n, "socketio")]
        if all(k in a and k in b for k in ks):
            x = (a[(n, "socketio")]["us"] / a[(n, "chat")]["us"]) / (b[(n, "socketio")]["us"] / b[(n, "chat")]["us"])
            dd.append(x)
            if all(r[k]["builds"] == 0 for r in (a, b) for k in ks):
                quiet.append(x)
print(f"| all ({len(dd)}) | {fmtr(dd)} | {mse(dd)} |")
if len(quiet) > 1:
    print(f"| no cargo/rustc/clippy/rustfmt process before any of the 4 runs ({len(quiet)}) | {fmtr(quiet)} | {mse(quiet)} |")
print("\n## Every run\n")
print("| invocation | round | path | position | µs/msg | round trips/s | backend CPU s | load1 | CPU some avg10 % | cargo/rustc procs | errors |")
print("| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
allload, allpsi, allb = [], [], []
for i, v, r in data:
    for (n, p), x in sorted(r.items(), key=lambda kv: (kv[0][0], kv[1]["position"])):
        allload.append(x["load"]); allpsi.append(x["psi"] or 0); allb.append(x["builds"])
        print(f"| {i}-{v} | {n} | {p} | {x['position']} | {x['us']:.3f} | {x['rate']:,.0f} | {x['bcpu']:.2f} | {x['load']:.2f} | {x['psi']} | {x['builds']} | {x['errors']} |")
print(f"\nLoad before runs: load1 {min(allload):.2f}-{max(allload):.2f}, CPU some avg10 {min(allpsi):.1f}-{max(allpsi):.1f} %, "
      f"cargo/rustc/clippy/rustfmt processes seen before {sum(b > 0 for b in allb)} of {len(allb)} runs (max {max(allb)}).")
