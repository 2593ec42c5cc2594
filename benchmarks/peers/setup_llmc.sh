#!/usr/bin/env bash
# Build what llmc_gptq.py needs (see README.md in this folder):
#   venv  /work/venvs/llmc   llmcompressor 0.14.0.1 on the local CPU torch 2.13.0
#   dir   .devdeps-llmc/     pure-Python runtime deps to put on PYTHONPATH where torch
#                            (and possibly transformers) is already installed, e.g. the H100
#                            image; _py312/ holds the two version-specific ones for CPython 3.12
# Usage: bash benchmarks/peers/setup_llmc.sh [venv|devdeps|all]   (default: all)
set -euo pipefail
REPO=$(cd "$(dirname "$0")/../.." && pwd)
VENV=${LLMC_VENV:-/work/venvs/llmc}
DEV=$REPO/.devdeps-llmc
CONS=$(mktemp); echo 'torch==2.13.0' > "$CONS"   # never let pip pick another torch

venv() {
  [ -x "$VENV/bin/python" ] || python3.11 -m venv "$VENV"
  "$VENV/bin/pip" install -q torch==2.13.0
  "$VENV/bin/pip" install -q -c "$CONS" llmcompressor==0.14.0.1 safetensors
}

devdeps() {
  local pip="$VENV/bin/pip"
  rm -rf "$DEV"
  "$pip" install -q --target "$DEV" --no-deps \
    llmcompressor==0.14.0.1 compressed-tensors==0.19.0 transformers==5.17.0 loguru==0.7.3 \
    accelerate==1.15.0 requests==2.34.2 urllib3==2.8.0 \
    pydantic==2.14.3 annotated-types==0.8.0 typing-inspection==0.4.5 typing-extensions==4.16.0 \
    datasets==5.2.0 dill==0.4.1
  "$pip" install -q --target "$DEV" --no-deps --only-binary=:all: --platform any \
    --implementation py --python-version 3.11 charset-normalizer==3.5.2
  "$pip" install -q --target "$DEV/_py312" --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 pydantic-core==2.50.4 multiprocess==0.70.19
  rm -rf "$DEV/bin"
  find "$DEV" -name __pycache__ -type d -prune -exec rm -rf {} +
  du -sh "$DEV"
}

case "${1:-all}" in
  venv) venv ;;
  devdeps) devdeps ;;
  all) venv; devdeps ;;
  *) echo "usage: $0 [venv|devdeps|all]" >&2; exit 2 ;;
esac
rm -f "$CONS"
