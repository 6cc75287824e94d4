#!/usr/bin/env bash
# One node: torchrun with NPROC ranks (default: the number of GPUs, or 2 on CPU).
# Usage: launch/torchrun.sh [--config FILE] [section.key=value ...]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
[ -x .venv/bin/python ] && PY=.venv/bin/python
if [ -z "${NPROC:-}" ]; then
  NPROC=$("$PY" -c 'import torch; print(torch.cuda.device_count() or 2)')
fi
args=("$@")
if [[ " ${args[*]-} " != *" --config "* ]]; then
  args=(--config configs/default.yaml "${args[@]}")
fi
exec "$PY" -m torch.distributed.run --standalone --nproc_per_node="$NPROC" train.py "${args[@]}"
