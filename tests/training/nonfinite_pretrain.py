"""launch/pretrain.py with a non-finite loss or gradient at chosen forward calls on one rank (fault injection).

FINECLIP_TEST_NONFINITE_CALLS: comma-separated 1-based forward-call numbers; FINECLIP_TEST_NONFINITE_RANK: the
rank; FINECLIP_TEST_NONFINITE_KIND: 'loss' (the loss made NaN) or 'gradient' (the loss stays finite, so the
loss guard lets the micro-batch through to backward and the optimizer, and its gradient is inf).
"""
import os
import runpy
from pathlib import Path

import torch

from fineclip_ds.losses.objective import FineCLIPObjective

BAD_CALLS = {int(call) for call in os.environ["FINECLIP_TEST_NONFINITE_CALLS"].split(",")}
BAD_RANK = int(os.environ.get("FINECLIP_TEST_NONFINITE_RANK", "1"))
KIND = os.environ["FINECLIP_TEST_NONFINITE_KIND"]
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


CORRUPT = {"loss": lambda total: total * float("nan"), "gradient": _InfGradient.apply}[KIND]


def _forward_with_fault(self, batch):
    global _calls
    _calls += 1
    total, report = _original_forward(self, batch)
    if _calls in BAD_CALLS and int(os.environ.get("RANK", "0")) == BAD_RANK:
        total = CORRUPT(total)
    return total, report


FineCLIPObjective.forward = _forward_with_fault
runpy.run_path(str(Path(__file__).resolve().parents[2] / "launch" / "pretrain.py"), run_name="__main__")
