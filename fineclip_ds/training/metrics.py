"""Throughput, step time and peak memory in one place."""
from __future__ import annotations

import resource
import sys
import time

import torch


def peak_memory_mb() -> float:
    """Peak GPU memory allocated on this device, or the process's peak RSS on a CPU run."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10


class Throughput:
    """Samples/s and seconds/step over the steps since the last `read`."""

    def __init__(self) -> None:
        self._start = time.perf_counter()
        self._samples = 0
        self._steps = 0

    def update(self, samples: int) -> None:
        self._samples += samples
        self._steps += 1

    def read(self) -> dict[str, float]:
        elapsed = max(time.perf_counter() - self._start, 1e-9)
        result = {"samples_per_s": self._samples / elapsed, "step_time_s": elapsed / max(self._steps, 1)}
        self.__init__()
        return result
