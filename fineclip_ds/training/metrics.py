"""Throughput, step time, achieved TFLOPs, MFU and peak memory in one place."""
from __future__ import annotations

import dataclasses
import resource
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

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

    def peek(self) -> dict[str, float]:
        """The window's figures so far, the window going on."""
        elapsed = max(time.perf_counter() - self._start, 1e-9)
        return {"steps": self._steps, "samples_per_s": self._samples / elapsed,
                "step_time_s": elapsed / max(self._steps, 1), "tflops_per_device": self._flops / elapsed / 1e12}

    def read(self) -> dict[str, float]:
        """The window's figures; the next window starts now."""
        result = self.peek()
        self.__init__()
        return result


@dataclass(frozen=True)
class RunTotals:
    """A run's training figures over all its starts. A run resumed from its checkpoint (a SLURM requeue,
    a crash) adds each start's steps to what the checkpoint carried, so that summary.json describes the
    run rather than its last start. Seconds are also kept per device (seconds x ranks), which keeps
    TFLOP/s per device right when a resume changes the world size."""
    starts: int = 0
    steps: int = 0
    samples: float = 0.0
    seconds: float = 0.0
    device_seconds: float = 0.0
    teraflops: float = 0.0  # all ranks together
    peak_memory_mb: float = 0.0

    @classmethod
    def from_state(cls, state: dict[str, Any] | None) -> RunTotals:
        """Checkpoints written before these totals were saved start the count afresh."""
        return cls(**state) if state else cls()

    def state_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def plus(self, start: dict[str, float], world_size: int) -> RunTotals:
        """These totals with one start's figures (a reading of `_device_figures_over_ranks`) added."""
        seconds = start["step_time_s"] * start["steps"]
        return RunTotals(
            starts=self.starts + 1, steps=self.steps + int(start["steps"]),
            samples=self.samples + start["samples_per_s"] * seconds, seconds=self.seconds + seconds,
            device_seconds=self.device_seconds + seconds * world_size,
            teraflops=self.teraflops + start["tflops_per_device"] * seconds * world_size,
            peak_memory_mb=max(self.peak_memory_mb, start["peak_memory_mb"]))

    def figures(self) -> dict[str, float]:
        """The run's figures, under the names of a Throughput reading."""
        seconds = max(self.seconds, 1e-9)
        return {"steps": self.steps, "samples_per_s": self.samples / seconds, "step_time_s": seconds / max(self.steps, 1),
                "tflops_per_device": self.teraflops / max(self.device_seconds, 1e-9),
                "peak_memory_mb": self.peak_memory_mb, "starts": self.starts}
