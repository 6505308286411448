"""launch/pretrain.py with a finite loss whose gradient is inf at chosen forward calls on one rank (fault injection).

FINECLIP_TEST_INF_GRAD_CALLS: comma-separated 1-based forward-call numbers; FINECLIP_TEST_INF_GRAD_RANK: the rank.
The loss itself stays finite, so the loss guard lets the micro-batch through to backward and the optimizer.
"""
import os
import runpy
from pathlib import Path

import torch

from fineclip_ds.losses.objective import FineCLIPObjective

BAD_CALLS = {int(call) for call in os.environ["FINECLIP_TEST_INF_GRAD_CALLS"].split(",")}
BAD_RANK = int(os.environ.get("FINECLIP_TEST_INF_GRAD_RANK", "1"))
_original_forward = FineCLIPObjective.forward
_calls = 0


class _InfGradient(torch.autograd.Function):
    """Identity forward; backward sends inf to every parameter the loss depends on."""

    @staticmethod
    def forward(ctx, total):
        return total.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("inf")


def _forward_with_inf_gradient(self, batch):
    global _calls
    _calls += 1
    total, report = _original_forward(self, batch)
    if _calls in BAD_CALLS and int(os.environ.get("RANK", "0")) == BAD_RANK:
        total = _InfGradient.apply(total)
    return total, report


FineCLIPObjective.forward = _forward_with_inf_gradient
runpy.run_path(str(Path(__file__).resolve().parents[2] / "launch" / "pretrain.py"), run_name="__main__")
