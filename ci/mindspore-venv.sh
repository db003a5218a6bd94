#!/usr/bin/env bash
# Creates (once) a virtual environment with the MindSpore that reshard's
# conformance tests use as their oracle, and prints its python's path.
#   RESHARD_VENV   where to put it (default: <repo>/.venv)
# mindspore 2.10 is built against numpy 1.x: with numpy 2 its bfloat16
# tensors fail, so numpy is pinned.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
venv=${RESHARD_VENV:-$root/.venv}
py=$venv/bin/python
want_ms=2.10.0
want_np=1.26.4

have() {
  "$py" - "$want_ms" "$want_np" <<'PY' >/dev/null 2>&1
import sys
from importlib.metadata import version
sys.exit(0 if (version("mindspore"), version("numpy")) == (sys.argv[1], sys.argv[2]) else 1)
PY
}

if [ ! -x "$py" ]; then
  echo "ci: creating $venv" >&2
  python3 -m venv "$venv" >&2
fi
if ! have; then
  echo "ci: installing mindspore==$want_ms numpy==$want_np into $venv" >&2
  "$py" -m pip install --quiet --disable-pip-version-check "mindspore==$want_ms" "numpy==$want_np" >&2
  have || { echo "ci: mindspore $want_ms / numpy $want_np not importable after install" >&2; exit 1; }
fi
echo "$py"
