"""launch/pretrain.py with a background thread adding tensors until the process ends, as gloo's worker
threads may still release tensors when a finished run exits; and a report, at exit, of whether the
rank's process group is still up.

A thread that touches a tensor while the interpreter finalizes aborts the process ("terminate called
without an active exception"); this one does so on every normal interpreter exit.
"""
import atexit
import os
import runpy
import threading
from pathlib import Path

import torch
import torch.distributed as dist


def _add_forever() -> None:
    tensor = torch.randn(100)
    while True:
        tensor + tensor


threading.Thread(target=_add_forever, daemon=True).start()
atexit.register(lambda: print(f"rank {os.environ.get('RANK')} process group alive at exit: {dist.is_initialized()}",
                              flush=True))
runpy.run_path(str(Path(__file__).resolve().parents[2] / "launch" / "pretrain.py"), run_name="__main__")
