"""DeepSpeed's per-node launcher (`deepspeed.launcher.launch`) started directly for $LOCAL_SIZE local ranks, as
the `deepspeed` runner starts it on one node. The runner's own process (one more import of deepspeed, then its
exit: ~3 s of a 17.8 s 2-rank launch, measured here) is left out of the tests that need many runs; the shared
`runs` fixture still goes through the runner, as a user's `deepspeed launch/pretrain.py` does."""
from __future__ import annotations

import os
import sys

from deepspeed.launcher import launch
from deepspeed.launcher.runner import encode_world_info


def main() -> None:
    ranks = list(range(int(os.environ.get("LOCAL_SIZE", "1"))))
    sys.argv = [launch.__file__, f"--world_info={encode_world_info({'localhost': ranks})}",
                "--master_addr=127.0.0.1", *sys.argv[1:]]
    launch.main()


if __name__ == "__main__":
    main()
