#!/bin/bash
# Two nodes × 8 GPUs with torchrun (no SLURM). Run on every node, with the same MASTER_ADDR (node 0's address):
#   NODE_RANK=0 MASTER_ADDR=10.0.0.1 bash recipes/cluster/torchrun.sh recipes/grpo_flowportrait.yaml recipes/cluster/ddp.yaml
#   NODE_RANK=1 MASTER_ADDR=10.0.0.1 bash recipes/cluster/torchrun.sh recipes/grpo_flowportrait.yaml recipes/cluster/ddp.yaml
# torchrun starts the 8 processes of its node; Lightning reads the ranks torchrun sets (TorchElasticEnvironment).
set -euo pipefail
RECIPE=${1:?usage: torchrun.sh RECIPE [OVERLAY]}
OVERLAY=${2:-recipes/cluster/ddp.yaml}
NODES=${NODES:-2}
GPUS=${GPUS:-8}
.venv/bin/torchrun --nnodes "$NODES" --nproc-per-node "$GPUS" --node-rank "${NODE_RANK:?set NODE_RANK}" \
  --master-addr "${MASTER_ADDR:?set MASTER_ADDR}" --master-port "${MASTER_PORT:-29500}" \
  -m prefalign.cli fit --config "$RECIPE" --config "$OVERLAY" \
  --trainer.devices "$GPUS" --trainer.num_nodes "$NODES" --ckpt_path last
