"""Throughput, step time, achieved TFLOPs, MFU and peak memory in one place."""
from __future__ import annotations

import resource
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

import torch


def peak_memory_mb() -> float:
    """Peak GPU memory allocated on this device, or the process's peak RSS on a CPU run."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10


# Dense bf16 tensor-core peaks (TFLOP/s, no sparsity) from the vendors' data sheets, matched in this
# order against torch.cuda.get_device_name(): a longer name before the name it contains (GB200 before
# B200, GH200 before H200; the PCIe / NVL cards before the SXM part of the same name).
PEAK_BF16_TFLOPS = {"GB200": 2500.0, "B200": 2250.0, "GH200": 989.0, "H200 NVL": 835.0, "H200": 989.0,
                    "H100 PCIe": 756.0, "H100 NVL": 835.0, "H100": 989.0, "H800 PCIe": 756.0, "H800": 989.0,
                    "A100": 312.0}


def peak_tflops(device_name: str) -> float | None:
    """The bf16 peak of a known GPU, or None (CPU, unknown GPU): MFU is then not reported."""
    return next((peak for name, peak in PEAK_BF16_TFLOPS.items() if name in device_name), None)


def device_name() -> str:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


class Throughput:
    """Samples/s, seconds/step and achieved model TFLOP/s on this rank since the last `read`,
    leaving out the time spent inside `paused()` (evaluation, checkpoint saves)."""

    def __init__(self) -> None:
        self._start = time.perf_counter()
        self._samples = 0
        self._steps = 0
        self._flops = 0

    def update(self, samples: int, flops: int) -> None:
        """samples: global samples of the step; flops: model FLOPs this rank computed in it."""
        self._samples += samples
        self._steps += 1
        self._flops += flops

    @contextmanager
    def paused(self) -> Iterator[None]:
        """Work that is not training (evaluation, checkpointing): its time counts in no window."""
        started = time.perf_counter()
        try:
            yield
        finally:
            self._start += time.perf_counter() - started

    def read(self) -> dict[str, float]:
        elapsed = max(time.perf_counter() - self._start, 1e-9)
        result = {"steps": self._steps, "samples_per_s": self._samples / elapsed, "step_time_s": elapsed / max(self._steps, 1),
                  "tflops_per_device": self._flops / elapsed / 1e12}
        self.__init__()
        return result
