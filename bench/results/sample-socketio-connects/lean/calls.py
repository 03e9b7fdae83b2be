#!/usr/bin/env python3
# calls to a function in a callgrind output (summed over call sites), per echo
import json, re, sys
cg, lg, pat = sys.argv[1], sys.argv[2], sys.argv[3]
n = json.load(open(lg))["messages"]["received"]
names = {}; target = set(); calls = 0; pending = None
for line in open(cg, errors="replace"):
    m = re.match(r"c?fn=\((\d+)\)(?: (.*))?", line)
    if m:
        if m.group(2): names[m.group(1)] = m.group(2)
        if line.startswith("cfn=") and pat in names.get(m.group(1), ""): pending = True
        elif line.startswith("cfn="): pending = False
        continue
    if line.startswith("calls=") and pending:
        calls += int(line.split("=")[1].split()[0]); pending = False
print(f"{cg}: {calls:,} calls to *{pat}*, {calls/n:.3f} per echo ({n:,} echoes)")
