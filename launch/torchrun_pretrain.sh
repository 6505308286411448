#!/usr/bin/env bash
# Multi-node FineCLIP training with torchrun (no ssh between nodes: run this on every node).
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=node-001 bash launch/torchrun_pretrain.sh --recipe vit-l-14 \
#       --deepspeed_config ds_configs/zero3_vit_l.json
# Any further arguments go to launch/pretrain.py. On one node without MASTER_PORT, torchrun runs --standalone
# on a free port.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${NNODES:-1}" -gt 1 ]; then
    # left to their defaults, every node would be rank 0 of its own rendezvous on 127.0.0.1 and wait forever
    for required in MASTER_ADDR NODE_RANK; do
        if [ -z "${!required:-}" ]; then
            echo "torchrun_pretrain.sh: NNODES=${NNODES} needs ${required} set on every node" >&2
            exit 2
        fi
    done
fi
if [ "${NNODES:-1}" -eq 1 ] && [ -z "${MASTER_PORT:-}" ]; then
    # one node, no port asked for: torchrun picks a free one, so two single-node jobs on one machine both start
    rendezvous=(--standalone)
else
    rendezvous=(--nnodes "${NNODES:-1}" --node_rank "${NODE_RANK:-0}"
                --master_addr "${MASTER_ADDR:-127.0.0.1}" --master_port "${MASTER_PORT:-29500}")
fi
exec torchrun "${rendezvous[@]}" \
    --nproc_per_node "${GPUS_PER_NODE:-$(python -c 'import torch; print(max(torch.cuda.device_count(), 1))')}" \
    launch/pretrain.py "$@"
