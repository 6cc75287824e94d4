#!/usr/bin/env bash
# Several nodes without Slurm: run this once on every node, each with its own NODE_RANK.
#
#   NNODES=2 NODE_RANK=0 HEAD=10.0.0.1 launch/multinode.sh --config configs/default.yaml   # on node 0
#   NNODES=2 NODE_RANK=1 HEAD=10.0.0.1 launch/multinode.sh --config configs/default.yaml   # on node 1
#
# torchrun's c10d rendezvous meets at HEAD:PORT (a host every node reaches, usually node 0).
# Environment: NNODES (required), NODE_RANK (required), HEAD (required), PORT (default 29400),
# RDZV_ID (the job's identity, the same on every node; default none: every launch starts a new
# run directory -- give each job its own id, and a restarted job that keeps it resumes its run), NPROC (default: GPUs per node, or 2 on CPU), MAX_RESTARTS
# (default 0). Extra arguments go to train.py. The run directory (logging.root) must be on a
# filesystem every node sees.
set -euo pipefail
cd "$(dirname "$0")/.."
: "${NNODES:?set NNODES, the number of nodes}" "${NODE_RANK:?set NODE_RANK, 0..NNODES-1}" "${HEAD:?set HEAD, the rendezvous host}"
PY=${PYTHON:-python}
[ -x .venv/bin/python ] && PY=.venv/bin/python
if [ -z "${NPROC:-}" ]; then
  NPROC=$("$PY" -c 'import torch; print(torch.cuda.device_count() or 2)')
fi
exec "$PY" -m torch.distributed.run --nnodes="$NNODES" --node-rank="$NODE_RANK" --nproc_per_node="$NPROC" \
  --rdzv-backend=c10d --rdzv-endpoint="$HEAD:${PORT:-29400}" --rdzv-id="${RDZV_ID:-none}" \
  --max-restarts="${MAX_RESTARTS:-0}" train.py "$@"
