#!/usr/bin/env bash
# Runs every fuzz target for a bounded time (RESHARD_FUZZ_SECONDS, default
# 20 s each) from the corpus in fuzz/corpus/. cargo-fuzz needs a nightly
# compiler's -Z flags; on the stable toolchain RUSTC_BOOTSTRAP=1 enables
# them. New inputs found are kept in the corpus directory.
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${RESHARD_FUZZ_SECONDS:-20}
if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "ci: installing cargo-fuzz" >&2
  cargo install cargo-fuzz --locked --quiet
fi
export RUSTC_BOOTSTRAP=1
for target in ckpt_index strategy safetensors_header layout auto_config strategy_consistency torch_archive; do
  echo "ci: fuzzing $target for ${secs}s" >&2
  # A private copy of the corpus: CI does not modify the checkout.
  work=$(mktemp -d)
  cp -r "fuzz/corpus/$target/." "$work/"
  cargo fuzz run --fuzz-dir fuzz "$target" "$work" -- -max_total_time="$secs" -timeout=10 -rss_limit_mb=2048 2>&1 | tail -n 3
  rm -rf "$work"
done
