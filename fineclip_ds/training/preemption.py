"""Graceful stop on the signals clusters send before a kill (SLURM: SIGTERM, or SIGUSR1 with --signal).

The handler only sets a flag; the training loop asks `requested()` once per step, which all-reduces
the flag so that every rank stops after the same step, writes the same checkpoint and exits 0.
"""
from __future__ import annotations

import logging
import signal

import torch
import torch.distributed as dist

log = logging.getLogger("fineclip_ds")
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


def leave_stop_signals_to_the_trainer(worker_id: int) -> None:
    """DataLoader `worker_init_fn`: a worker ignores the stop signals. Slurm (scancel, preemption, the
    time limit's --signal) signals every process of the job step, workers included, and torch's own
    SIGTERM handler ended a worker, so the trainer failed with 'DataLoader worker ... is killed by
    signal: Terminated' instead of saving. The trainer ends its workers itself when it stops."""
    for stop_signal in STOP_SIGNALS:
        signal.signal(stop_signal, signal.SIG_IGN)


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
                        signal.Signals(self._received).name)
        return flag.item() > 0
