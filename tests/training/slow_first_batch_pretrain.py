"""launch/pretrain.py with a data stream whose first batch takes FIRST_BATCH_DELAY_S seconds more to arrive, as a DataLoader's start-up
or a resume's fast-forward through its shards does, so that whether that wait counts as training shows."""
import os
import runpy
import time
from pathlib import Path

from fineclip_ds.training import engine

FIRST_BATCH_DELAY_S = float(os.environ["FIRST_BATCH_DELAY_S"])
build_train_stream = engine.build_train_stream


class SlowFirstBatch:
    """The built stream, its first batch late."""

    def __init__(self, stream):
        self.stream = stream

    def __getattr__(self, name):
        return getattr(self.stream, name)

    def __iter__(self):
        time.sleep(FIRST_BATCH_DELAY_S)
        yield from self.stream


engine.build_train_stream = lambda *args, **kwargs: SlowFirstBatch(build_train_stream(*args, **kwargs))
runpy.run_path(str(Path(__file__).resolve().parents[2] / "launch" / "pretrain.py"), run_name="__main__")
