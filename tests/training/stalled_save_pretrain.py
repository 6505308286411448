"""launch/pretrain.py whose checkpoint save at one step stalls half-way, for a real kill -9 (fault injection).

FINECLIP_TEST_STALL_STEP: the step whose save stalls on every rank once DeepSpeed has written its files
into the partial folder, before the folder is renamed and `latest` moves; each rank then creates
FINECLIP_TEST_STALL_DIR/rank<r> and sleeps until it is killed.
"""
import os
import runpy
import time
from pathlib import Path

from deepspeed.runtime.engine import DeepSpeedEngine

from fineclip_ds.training import checkpoint

STALL_TAG = checkpoint.tag_for_step(int(os.environ["FINECLIP_TEST_STALL_STEP"])) + checkpoint.PARTIAL_SUFFIX
_original_save = DeepSpeedEngine.save_checkpoint


def _save_then_stall(self, save_dir, tag=None, **kwargs):
    saved = _original_save(self, save_dir, tag=tag, **kwargs)
    if tag == STALL_TAG:
        (Path(os.environ["FINECLIP_TEST_STALL_DIR"]) / f"rank{self.global_rank}").touch()
        time.sleep(3600)
    return saved


DeepSpeedEngine.save_checkpoint = _save_then_stall
runpy.run_path(str(Path(__file__).resolve().parents[2] / "launch" / "pretrain.py"), run_name="__main__")
