"""Graceful stop on the signals clusters send before a kill (SLURM: SIGTERM, or SIGUSR1 with --signal).

The handler only sets a flag; the training loop asks `requested()` once per step, which all-reduces
the flag so that every rank stops after the same step, writes the same checkpoint and exits 0.
"""
from __future__ import annotations

import logging
import signal

import torch
import torch.distributed as dist

from fineclip_ds.data.workers import STOP_SIGNALS
from fineclip_ds.run_logging import PER_RANK

log = logging.getLogger("fineclip_ds")


class PreemptionWatch:
    def __init__(self) -> None:
        self._received: int | None = None
        for stop_signal in STOP_SIGNALS:
            signal.signal(stop_signal, self._handle)

    def _handle(self, signum: int, frame) -> None:
        self._received = signum

    def requested(self, world_size: int, device: torch.device) -> bool:
        """Collective: True on every rank when any rank received a stop signal. `device` is the
        process group's (NCCL reduces CUDA tensors only)."""
        flag = torch.tensor([1.0 if self._received is not None else 0.0], device=device)
        if world_size > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item() > 0 and self._received is not None:
            log.warning("received %s: finishing this step, saving a checkpoint and exiting",
                        signal.Signals(self._received).name, extra=PER_RANK)
        return flag.item() > 0
