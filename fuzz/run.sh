#!/usr/bin/env bash
# Run every fuzz target for SECS seconds (default 600), one after another,
# starting from the committed seeds; prints libFuzzer's final stats line.
#   bash fuzz/run.sh [SECS] [TARGET...]
# Needs cargo-fuzz (`cargo install cargo-fuzz`); on a stable toolchain,
# RUSTC_BOOTSTRAP=1 lets it use the sanitizer flags.
# Each target's property is a function in tests/src/fuzz.rs; `cargo test`
# runs the same functions over the seeds and seeded mutations of them for a
# few seconds (tests/tests/fuzz_smoke.rs). An input that fails here belongs
# in seeds/<target>/ once fixed: the smoke then replays it on every run.
set -euo pipefail
cd "$(dirname "$0")"
secs=${1:-600}
shift || true
targets=("$@")
[ ${#targets[@]} -eq 0 ] && targets=(preamble mesh_file spiffe_id ca_csr)
export RUSTC_BOOTSTRAP=1
for t in "${targets[@]}"; do
  mkdir -p "corpus/$t"
  echo "== $t (${secs}s)"
  cargo fuzz run -O "$t" "corpus/$t" "seeds/$t" -- \
    -max_total_time="$secs" -print_final_stats=1 -max_len=8192 2>&1 \
    | grep -E "^(#[0-9]+.*DONE|stat::|Done|==[0-9]+==ERROR|SUMMARY|artifact)" || true
  echo "corpus: $(ls "corpus/$t" | wc -l) inputs"
done
