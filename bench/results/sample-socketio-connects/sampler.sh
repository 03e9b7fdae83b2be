#!/usr/bin/env bash
# Every ~5 s: time, load average, CPU pressure, and processes above 15 % of a
# core over the last second (second frame of top -b -n 2 -d 1).
# sampler.sh FILE  (runs until killed)
while :; do
    { echo "== $(date -u +%T) load $(cut -d' ' -f1-3 /proc/loadavg) $(head -1 /proc/pressure/cpu)"
      top -b -n 2 -d 1 -w 200 | awk '/^top -/ {f++} f == 2 && $1 ~ /^[0-9]+$/ && $9 > 15 {print $1, $9, $12}'; } >>"$1"
    sleep 4
done
