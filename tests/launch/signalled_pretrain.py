"""launch/pretrain.py that sends itself FINECLIP_TEST_SIGNAL (default SIGUSR1, as `#SBATCH --signal=USR1@120`
does) during forward call FINECLIP_TEST_SIGNAL_CALL (1-based): a stop signal arriving at a chosen step."""
import os
import runpy
import signal
from pathlib import Path

from fineclip_ds.losses.objective import FineCLIPObjective

SIGNAL_CALL = int(os.environ["FINECLIP_TEST_SIGNAL_CALL"])
STOP_SIGNAL = getattr(signal, os.environ.get("FINECLIP_TEST_SIGNAL", "SIGUSR1"))
_original_forward = FineCLIPObjective.forward
_calls = 0


def _forward_then_signal(self, batch):
    global _calls
    _calls += 1
    if _calls == SIGNAL_CALL:
        os.kill(os.getpid(), STOP_SIGNAL)
    return _original_forward(self, batch)


FineCLIPObjective.forward = _forward_then_signal
runpy.run_path(str(Path(__file__).resolve().parents[2] / "launch" / "pretrain.py"), run_name="__main__")
