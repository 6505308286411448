"""launch/pretrain.py with the loss made NaN at chosen forward calls on one rank (fault injection).

FINECLIP_TEST_NAN_CALLS: comma-separated 1-based forward-call numbers; FINECLIP_TEST_NAN_RANK: the rank.
"""
import os
import runpy
from pathlib import Path

from fineclip_ds.losses.objective import FineCLIPObjective

BAD_CALLS = {int(call) for call in os.environ["FINECLIP_TEST_NAN_CALLS"].split(",")}
BAD_RANK = int(os.environ.get("FINECLIP_TEST_NAN_RANK", "1"))
_original_forward = FineCLIPObjective.forward
_calls = 0


def _forward_with_nan(self, batch):
    global _calls
    _calls += 1
    total, report = _original_forward(self, batch)
    if _calls in BAD_CALLS and int(os.environ.get("RANK", "0")) == BAD_RANK:
        total = total * float("nan")
    return total, report


FineCLIPObjective.forward = _forward_with_nan
runpy.run_path(str(Path(__file__).resolve().parents[2] / "launch" / "pretrain.py"), run_name="__main__")
