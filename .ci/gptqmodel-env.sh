#!/usr/bin/env bash
# A virtualenv with GPTQModel and optimum — transformers' GPTQ/AWQ backends — on the CPU torch
# 2.13.0, where tests/engines/ load our hf-gptq / hf-awq checkpoints as users do. GPTQModel
# pins numpy 2.2.6, so it lives beside the project's environment, not in it. A no-op when it
# exists (about 2 minutes on 2 cores the first time: gptqmodel and five helpers build from
# source). Prints QF_GPTQMODEL_PYTHON=<the venv's python>.
set -euo pipefail
DEST="${QF_ENGINES_DIR:-$HOME/.cache/quantfoundry-engines}/gptqmodel-7.6.0"
if [ ! -f "$DEST/.complete" ]; then
  rm -rf "$DEST"
  python3 -m venv "$DEST"
  constraints="$(mktemp)"
  echo "torch==2.13.0" > "$constraints"
  "$DEST/bin/pip" install --quiet -c "$constraints" torch==2.13.0
  MAX_JOBS=2 "$DEST/bin/pip" install --quiet -c "$constraints" gptqmodel==7.6.0 optimum==2.3.0 transformers==5.25.0
  rm -f "$constraints"
  touch "$DEST/.complete"
fi
echo "QF_GPTQMODEL_PYTHON=$DEST/bin/python"
