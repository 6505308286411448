"""launch/pretrain.py with every rank's FLOPs and peak memory made to differ (rank r: r + 1 TFLOP per
micro-batch, 1000 * (r + 1) MB), so that which ranks a logged figure comes from shows in its value."""
import os
import runpy
from pathlib import Path

from fineclip_ds.training import engine

RANK = int(os.environ.get("RANK", "0"))
engine.step_flops = lambda *args, **kwargs: (RANK + 1) * 10**12
engine.peak_memory_mb = lambda: 1000.0 * (RANK + 1)
runpy.run_path(str(Path(__file__).resolve().parents[2] / "launch" / "pretrain.py"), run_name="__main__")
