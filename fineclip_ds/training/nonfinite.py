"""Skip micro-batches whose loss is NaN or inf, on every rank together, and stop after too many in a row.

The check runs before backward, so a bad batch never reaches the gradients or the optimizer state;
ranks agree through one all-reduce so that no rank steps while another skips (which would hang ZeRO).
"""
from __future__ import annotations

import torch
import torch.distributed as dist


class NonFiniteLossError(RuntimeError):
    """Too many consecutive non-finite losses: training cannot make progress."""


class NonFiniteGuard:
    def __init__(self, max_in_a_row: int):
        self.max_in_a_row = max_in_a_row
        self.in_a_row = 0
        self.skipped = 0

    @property
    def exhausted(self) -> bool:
        return self.in_a_row >= self.max_in_a_row

    def all_ranks_finite(self, loss: torch.Tensor, world_size: int) -> bool:
        """Collective. False (and counted) when the loss is non-finite on any rank.

        The flag lives on the loss's device: NCCL reduces CUDA tensors only."""
        bad = (~torch.isfinite(loss.detach())).any().float().reshape(1)
        if world_size > 1:
            dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        if bad.item() > 0:
            self.in_a_row += 1
            self.skipped += 1
            return False
        self.in_a_row = 0
        return True
