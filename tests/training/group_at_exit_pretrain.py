"""launch/pretrain.py, then a report at interpreter exit of whether the rank's process group is still up.

The first atexit hook registered runs last, after every other one: what it sees is what finalization gets.
"""
import atexit
import os
import runpy
from pathlib import Path

import torch.distributed as dist

atexit.register(lambda: print(f"rank {os.environ.get('RANK')} process group alive at exit: {dist.is_initialized()}",
                              flush=True))
runpy.run_path(str(Path(__file__).resolve().parents[2] / "launch" / "pretrain.py"), run_name="__main__")
