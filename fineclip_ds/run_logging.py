"""The log lines of a multi-rank job: each line once, from rank 0, unless it is about one rank.

Every rank ran the same start-up checks, so a 64-rank job printed each run-wide warning (bf16 without a
GPU, warmup past max_steps, a branch's changed settings) 64 times. On ranks other than 0 this package's
records below ERROR are now dropped, except those logged with `extra=PER_RANK` (what differs between
ranks: an unreadable shard of its own, a signal it received). Every line names its rank.
"""
from __future__ import annotations

import logging

PACKAGE = "fineclip_ds"
PER_RANK = {"per_rank": True}


class _RunWideOnRankZero(logging.Filter):
    """Passes other libraries' records, errors, and this package's PER_RANK records."""

    def filter(self, record: logging.LogRecord) -> bool:
        ours = record.name == PACKAGE or record.name.startswith(PACKAGE + ".")
        return not ours or record.levelno >= logging.ERROR or getattr(record, "per_rank", False)


def configure_rank_logging(rank: int) -> None:
    """Console logging of a training process: this package at INFO, others at WARNING, lines tagged with
    the rank; on ranks other than 0 only the records PER_RANK or at ERROR of this package."""
    logging.basicConfig(level=logging.WARNING, format=f"%(asctime)s rank {rank} %(levelname)s %(name)s: %(message)s")
    logging.getLogger(PACKAGE).setLevel(logging.INFO)
    if rank > 0:
        for handler in logging.getLogger().handlers:
            handler.addFilter(_RunWideOnRankZero())
