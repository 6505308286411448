#!/usr/bin/env bash
# Multi-node FineCLIP training with torchrun (no ssh between nodes: run this on every node).
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=node-001 bash launch/torchrun_pretrain.sh --recipe vit-l-14 \
#       --deepspeed_config ds_configs/zero3_vit_l.json
# Any further arguments go to launch/pretrain.py.
set -euo pipefail
cd "$(dirname "$0")/.."
exec torchrun \
    --nnodes "${NNODES:-1}" \
    --node_rank "${NODE_RANK:-0}" \
    --nproc_per_node "${GPUS_PER_NODE:-$(python -c 'import torch; print(max(torch.cuda.device_count(), 1))')}" \
    --master_addr "${MASTER_ADDR:-127.0.0.1}" \
    --master_port "${MASTER_PORT:-29500}" \
    launch/pretrain.py "$@"
