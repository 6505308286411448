"""Skip micro-batches whose loss is NaN or inf, and optimizer steps DeepSpeed dropped for a NaN or inf
gradient, on every rank together; stop after too many in a row.

The loss check runs before backward, so a bad batch never reaches the gradients or the optimizer state;
ranks agree through one all-reduce so that no rank steps while another skips (which would hang ZeRO).
A finite loss can still give a non-finite gradient (an overflow in backward): DeepSpeed 0.19.8 finds it
at the optimizer step under ZeRO 1-3 and bf16/fp16 (its check is all-reduced, every rank skips) and
drops the step; the engine counts that here too, so that a run whose gradients stay non-finite stops
instead of running to max_steps without an update.
"""
from __future__ import annotations

import torch
import torch.distributed as dist


class NonFiniteLossError(RuntimeError):
    """Too many consecutive non-finite losses or gradients: training cannot make progress."""


# DeepSpeed 0.19.8's fp16 loss scaler raises a bare Exception starting so when its scale would go under
# fp16.min_loss_scale: every rank at once, since the overflow it reacts to is all-reduced
FP16_SCALE_AT_MINIMUM = "Current loss scale already at minimum"


def is_fp16_scale_at_minimum(error: Exception) -> bool:
    return type(error) is Exception and str(error).startswith(FP16_SCALE_AT_MINIMUM)


class NonFiniteGuard:
    def __init__(self, max_in_a_row: int):
        self.max_in_a_row = max_in_a_row
        self.in_a_row = 0  # skips since the last optimizer step that was applied
        self.skipped = 0

    @property
    def exhausted(self) -> bool:
        return self.in_a_row >= self.max_in_a_row

    def skip(self) -> None:
        self.in_a_row += 1
        self.skipped += 1

    def step_applied(self) -> None:
        self.in_a_row = 0

    def all_ranks_finite(self, loss: torch.Tensor, world_size: int) -> bool:
        """Collective. False (and counted) when the loss is non-finite on any rank.

        The flag lives on the loss's device: NCCL reduces CUDA tensors only."""
        bad = (~torch.isfinite(loss.detach())).any().float().reshape(1)
        if world_size > 1:
            dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        if bad.item() > 0:
            self.skip()
            return False
        return True
