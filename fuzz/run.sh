#!/usr/bin/env bash
# Run every fuzz target for a bounded time (default 60 s each).
#   fuzz/run.sh [SECONDS] [TARGET...]
# Needs cargo-fuzz (installed here if missing). libFuzzer needs nightly
# compiler flags; on a stable toolchain RUSTC_BOOTSTRAP=1 enables them.
# Each target starts from its committed seeds (fuzz/seeds/<target>/), uses
# fuzz/dicts/<target>.dict when there is one, and
# grows its corpus in fuzz/corpus/<target>/; findings land in
# fuzz/artifacts/<target>/ and the full libFuzzer output in
# fuzz/logs/<target>.log. Every target runs even if one crashes; the exit
# status is non-zero if any did.
set -uo pipefail
cd "$(dirname "$0")"
seconds=${1:-60}
shift || true
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(proxy_protocol upgrade_request forwarded_for session_key config frame_reader)
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked || exit 1
export RUSTC_BOOTSTRAP=1
cargo fuzz build || exit 1
mkdir -p logs
failed=()
for t in "${targets[@]}"; do
  echo "== $t ($seconds s)"
  mkdir -p "corpus/$t" "seeds/$t"
  dict=()
  [ -f "dicts/$t.dict" ] && dict=(-dict="dicts/$t.dict")
  if cargo fuzz run "$t" "corpus/$t" "seeds/$t" -- "${dict[@]}" \
      -max_total_time="$seconds" -rss_limit_mb=2048 -timeout=10 -print_final_stats=1 \
      >"logs/$t.log" 2>&1; then
    grep -E '^(#[0-9]+[[:space:]]+DONE|Done [0-9]+ runs|stat::number_of_executed_units|stat::average_exec_per_sec)' "logs/$t.log"
  else
    failed+=("$t")
    tail -n 40 "logs/$t.log"
  fi
  echo "corpus: $(find "corpus/$t" -type f | wc -l) files"
done
if [ ${#failed[@]} -gt 0 ]; then
  echo "FAILED: ${failed[*]} (see fuzz/logs/ and fuzz/artifacts/)"
  exit 1
fi
echo "all targets ran clean"
