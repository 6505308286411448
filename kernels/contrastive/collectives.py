"""The collectives of the contrastive loss, outside autograd; one process (no group) needs none of them."""
from __future__ import annotations

import torch
import torch.distributed as dist

from kernels.contrastive.torch_chunked import Stats, finite_or_zero


def group_shape(group: dist.ProcessGroup | None) -> tuple[int, int]:
    """(rank, world size) in `group`, the default group when distributed is initialised, else (0, 1)."""
    if not (dist.is_available() and dist.is_initialized()):
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def gather_rows(tensor: torch.Tensor, group: dist.ProcessGroup | None, world: int) -> torch.Tensor:
    """Every rank's rows, concatenated in rank order, without autograd."""
    # tensor: [b, ...] -> [world * b, ...]
    if world == 1:
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(world)]
    dist.all_gather(parts, tensor.contiguous(), group=group)
    return torch.cat(parts)


def require_same_shape(features: torch.Tensor, group: dist.ProcessGroup | None, world: int) -> None:
    """Raise the same ValueError on every rank unless all ranks hold features of one shape [b, D].

    The gathers that follow need it: on gloo, ranks of different b died in an abort (SIGABRT, "Received data
    size doesn't match expected size"); on NCCL such a gather may hang. This costs one [world, 2] gather and a
    host read of it per call."""
    # features: [b, D]
    shape = torch.tensor([list(features.shape)], dtype=torch.int64, device=features.device)
    shapes = gather_rows(shape, group, world).tolist()
    if any(other != shapes[0] for other in shapes):
        raise ValueError(f"contrastive_loss: ranks hold features of shapes {[tuple(s) for s in shapes]} (rank order), "
                         "expected one [b, D] on every rank: pad to the largest b and pass a mask")


def merge_column_stats(stats: Stats, group: dist.ProcessGroup | None, world: int) -> Stats:
    """Each rank holds column statistics over its own image rows; combine them over all ranks' rows.

    Two collectives on [N] and [2, N] floats (max, then the rescaled sums); a tiny fraction of the
    feature all-gather. Fixed reduction order per backend, so it is as deterministic as the backend.
    """
    # members: [N] -> [N]
    if world == 1:
        return stats
    top, total, weighted_dot = stats
    global_top = top.clone()
    dist.all_reduce(global_top, op=dist.ReduceOp.MAX, group=group)
    weight = torch.exp(top - finite_or_zero(global_top))
    sums = torch.stack([total * weight, weighted_dot * weight])
    dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=group)
    return global_top, sums[0], sums[1]


def reduce_to_owner(grad: torch.Tensor, group: dist.ProcessGroup | None, rank: int, world: int) -> torch.Tensor:
    """Sum every rank's gradient for the gathered rows and keep our slice: reduce-scatter on NCCL,
    all-reduce then slice elsewhere (gloo has no reduce_scatter)."""
    # grad: [world * b, D] -> [b, D]
    if world == 1:
        return grad
    rows = grad.shape[0] // world
    grad = grad.contiguous()
    if dist.get_backend(group) == dist.Backend.NCCL:
        mine = grad.new_empty(rows, *grad.shape[1:])
        dist.reduce_scatter_tensor(mine, grad, op=dist.ReduceOp.SUM, group=group)
        return mine
    dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=group)
    return grad[rank * rows:(rank + 1) * rows]
