#!/usr/bin/env bash
# Fetches (once) the mindformers wheels whose conversion code the convert
# conformance tests compare against, extracts only the converter modules,
# and prints the directory holding them (pass it as RESHARD_MINDFORMERS_SRC).
# Nothing is installed or imported as a package: the tests read these files
# and execute the pure name/layout functions they define.
#   RESHARD_VENV   cache root (default: <repo>/.venv), as ci/mindspore-venv.sh
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
cache=${RESHARD_VENV:-$root/.venv}/mindformers-src
py=$(ci/mindspore-venv.sh 2>/dev/null || command -v python3)
mkdir -p "$cache"
fetch() { # version, files...
  local v=$1; shift
  local dir=$cache/$v n
  local have=1
  for n in "$@"; do [ -f "$dir/$n" ] || have=0; done
  if [ -f "$dir/.complete" ] && [ "$have" = 1 ]; then return; fi
  local tmp; tmp=$(mktemp -d)
  "$py" -m pip download --quiet --disable-pip-version-check --no-deps "mindformers==$v" -d "$tmp" >&2
  mkdir -p "$dir"
  "$py" - "$tmp"/mindformers-"$v"-*.whl "$dir" "$@" <<'PY'
import sys, zipfile
whl, out, *names = sys.argv[1:]
with zipfile.ZipFile(whl) as z:
    for n in names:
        z.extract(n, out)
PY
  rm -rf "$tmp"
  echo "$*" >"$dir/.complete"
}
fetch 1.3.2 \
  mindformers/models/llama/convert_weight.py \
  mindformers/models/llama/convert_reversed.py \
  mindformers/models/gpt2/convert_weight.py \
  mindformers/models/whisper/convert_weight.py \
  mindformers/models/cogvlm2/convert_weight.py \
  mindformers/models/glm2/convert_weight.py \
  mindformers/tools/ckpt_transform/__init__.py \
  mindformers/tools/ckpt_transform/transform_checkpoint.py \
  mindformers/tools/ckpt_transform/utils.py
fetch 2.1.0 \
  mindformers/utils/convert_utils.py \
  mindformers/models/llama/llama.py \
  mindformers/models/glm2/glm2.py \
  mindformers/models/qwen3/utils.py \
  mindformers/models/qwen3_moe/utils.py \
  mindformers/parallel_core/utils/model_mixin.py \
  mindformers/checkpoint/converter/convert_op.py \
  mindformers/tools/ckpt_transform/__init__.py \
  mindformers/tools/ckpt_transform/transform_checkpoint.py \
  mindformers/tools/ckpt_transform/utils.py \
  mindformers/checkpoint/metadata.py \
  mindformers/checkpoint/sharded_tensor.py \
  mindformers/checkpoint/utils.py \
  mindformers/checkpoint/layout_adapter.py \
  mindformers/checkpoint/safetensors_utils.py \
  mindformers/checkpoint/fully_parallel.py \
  mindformers/checkpoint/checkpoint.py
echo "$cache"
