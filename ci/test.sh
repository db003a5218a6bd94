#!/usr/bin/env bash
# The full test suite: formatting and lint, unit tests, integration tests,
# and the conformance tests against real MindSpore 2.10 (installed into a
# local venv by ci/mindspore-venv.sh when missing). Plain `cargo test` runs
# everything except the MindSpore comparisons.
set -euo pipefail
cd "$(dirname "$0")/.."

if cargo fmt --version >/dev/null 2>&1; then
  cargo fmt --all -- --check
  cargo fmt --manifest-path python/Cargo.toml -- --check
else
  echo "ci: rustfmt not installed, skipping format check" >&2
fi
if cargo clippy --version >/dev/null 2>&1; then
  cargo clippy --workspace --all-targets -- -D warnings
  cargo clippy --workspace --all-targets --features ascend -- -D warnings
  # The Python bindings: their own workspace (root builds never need Python).
  CARGO_TARGET_DIR=$PWD/target cargo clippy --manifest-path python/Cargo.toml --all-targets -- -D warnings
else
  echo "ci: clippy not installed, skipping lint" >&2
fi

python=$(ci/mindspore-venv.sh)
export RESHARD_MINDSPORE_PYTHON=$python
# A conformance test that cannot find MindSpore fails instead of skipping.
export RESHARD_REQUIRE_MINDSPORE=1
# mindformers' own converter functions (read from its wheels, not
# installed) for the convert conformance tests.
RESHARD_MINDFORMERS_SRC=$(ci/mindformers.sh)
export RESHARD_MINDFORMERS_SRC
export RESHARD_REQUIRE_MINDFORMERS=1
# The CI machine has gcc: the C ABI test (a C program linked against
# libreshard) fails instead of skipping when `cc` is missing. (Not
# RESHARD_REQUIRE_CHATTR: `chattr +i` needs root and a filesystem with the
# immutable flag, which CI does not promise.)
export RESHARD_REQUIRE_CC=1
# The machine has few cores: one test thread at a time keeps the >512 MiB
# fixtures from being generated concurrently with everything else.
cargo test --workspace -- --test-threads="${RESHARD_TEST_THREADS:-2}"
# The Python package (python/, PyO3 + maturin): pip builds it into
# MindSpore's venv (fetching maturin from PyPI as the build backend), in the
# debug profile and the target/ the tests above just built, so only the
# bindings compile; then its conformance tests run through it against
# MindSpore and mindformers' own TransformCkpt. The last line gives counts.
CARGO_TARGET_DIR=$PWD/target MATURIN_PEP517_ARGS="--profile dev" \
  "$python" -m pip install --quiet --disable-pip-version-check --force-reinstall --no-deps ./python
"$python" python/tests/run.py
# The same suite again with the Ascend backend compiled in: the backend
# tests and every conformance case run a second time on the host emulator
# of the CANN subset (ffi/ascend-stub) and must give the same bytes.
# (Emulated, not verified on an NPU: see docs/ascend.md.)
cargo test --workspace --features ascend -- --test-threads="${RESHARD_TEST_THREADS:-2}"
# The benches must keep compiling.
cargo bench --no-run --quiet
# Fuzz every parser and the layout algebra for a bounded time.
RESHARD_FUZZ_SECONDS=${RESHARD_FUZZ_SECONDS:-15} ci/fuzz.sh
