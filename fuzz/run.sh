#!/usr/bin/env bash
# Run every fuzz target for a bounded time (default 60 s each).
#   fuzz/run.sh [SECONDS] [TARGET...]
# Needs cargo-fuzz (installed here if missing). libFuzzer needs nightly
# compiler flags; on a stable toolchain RUSTC_BOOTSTRAP=1 enables them.
# Findings land in fuzz/artifacts/<target>/; the corpus in fuzz/corpus/.
set -euo pipefail
cd "$(dirname "$0")"
seconds=${1:-60}
shift || true
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(proxy_protocol upgrade_request forwarded_for session_key config)
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
export RUSTC_BOOTSTRAP=1
for t in "${targets[@]}"; do
  echo "== $t ($seconds s)"
  cargo fuzz run "$t" -- -max_total_time="$seconds" -rss_limit_mb=2048 2>&1 | tail -n 5
done
