#!/usr/bin/env bash
# Build the virtualenv torchao_qat.py runs in (see README.md in this folder):
#   venv  /work/venvs/torchao   torchao 0.18.0 on the local CPU torch 2.13.0, transformers pinned
#                               to the system Python's (5.25.0), safetensors, numpy
# Idempotent: a venv that already imports the pinned versions is left alone.
# Usage: bash benchmarks/peers/setup_torchao.sh
set -euo pipefail
VENV=${TORCHAO_VENV:-/work/venvs/torchao}
TORCH=2.13.0
TORCHAO=0.18.0
TRANSFORMERS=5.25.0   # = python3 -m pip show transformers on this machine

complete() {
  [ -x "$VENV/bin/python" ] && "$VENV/bin/python" - "$TORCH" "$TORCHAO" "$TRANSFORMERS" <<'PY' 2>/dev/null
import sys
from importlib.metadata import version
want = dict(zip(("torch", "torchao", "transformers"), sys.argv[1:]))
ok = all(version(p).split("+")[0] == v for p, v in want.items())
for p in ("safetensors", "numpy"):
    version(p)
sys.exit(0 if ok else 1)
PY
}

if complete; then
  echo "$VENV: complete (torch $TORCH, torchao $TORCHAO, transformers $TRANSFORMERS)"
  exit 0
fi
CONS=$(mktemp); trap 'rm -f "$CONS"' EXIT
echo "torch==$TORCH" > "$CONS"   # never let pip pick another torch (it would download gigabytes)
[ -x "$VENV/bin/python" ] || python3.11 -m venv "$VENV"
"$VENV/bin/pip" install -q "torch==$TORCH"
"$VENV/bin/pip" install -q -c "$CONS" "torchao==$TORCHAO" "transformers==$TRANSFORMERS" safetensors numpy
complete || { echo "$VENV: install finished but the pinned versions do not import" >&2; exit 1; }
echo "$VENV: built (torch $TORCH, torchao $TORCHAO, transformers $TRANSFORMERS)"
