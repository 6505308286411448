"""A multi-rank job prints each run-wide log line once (rank 0), and what is about one rank from that rank."""
import subprocess
import sys

import pytest

LOG_FROM_RANK = """
import logging, sys
from fineclip_ds.run_logging import PER_RANK, configure_rank_logging
configure_rank_logging(int(sys.argv[1]))
logging.getLogger("fineclip_ds.training.optimizer").warning("run-wide warning")
logging.getLogger("fineclip_ds").info("run-wide info")
logging.getLogger("fineclip_ds").warning("about this rank", extra=PER_RANK)
logging.getLogger("fineclip_ds.data").error("an error")
logging.getLogger("deepspeed_like").warning("another library's warning")
logging.getLogger("fineclip_dsx").warning("a package merely named alike")
"""


@pytest.mark.parametrize("rank", [0, 1])
def test_ranks_after_the_first_print_only_their_own_lines_errors_and_other_libraries(rank):
    printed = subprocess.run([sys.executable, "-c", LOG_FROM_RANK, str(rank)], capture_output=True, text=True,
                             check=True).stderr.splitlines()
    expected = ["run-wide warning", "run-wide info"] if rank == 0 else []
    expected += ["about this rank", "an error", "another library's warning", "a package merely named alike"]
    assert [line.split(": ", 1)[1] for line in printed] == expected
    assert all(f" rank {rank} " in line for line in printed)
