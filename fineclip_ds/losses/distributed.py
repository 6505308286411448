"""The few collectives the losses need, written so one process (no process group) is the same code path."""
from __future__ import annotations

import torch
import torch.distributed as dist


def world_size(group: dist.ProcessGroup | None = None) -> int:
    return dist.get_world_size(group) if dist.is_available() and dist.is_initialized() else 1


def rank(group: dist.ProcessGroup | None = None) -> int:
    return dist.get_rank(group) if dist.is_available() and dist.is_initialized() else 0


def all_reduce_sum(value: torch.Tensor, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """Sum over ranks, outside autograd (counts and normalisers)."""
    value = value.detach().clone()
    if world_size(group) > 1:
        dist.all_reduce(value, op=dist.ReduceOp.SUM, group=group)
    return value


def all_reduce_max(value: int, device: torch.device, group: dist.ProcessGroup | None = None) -> int:
    tensor = torch.tensor([value], device=device, dtype=torch.long)
    if world_size(group) > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX, group=group)
    return int(tensor.item())
