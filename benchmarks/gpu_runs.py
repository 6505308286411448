"""What the GPU benchmark scripts share: the device, timing, and writing their section to BENCHMARKS.md.

Each script also has `--smoke`: tiny sizes on whatever device there is (on a CPU with
TRITON_INTERPRET=1, so Triton runs in its interpreter), so a test runs it end to end and a GPU
session, with its few minutes of device time, does not find a Python error first. Smoke numbers
measure nothing and are labelled so.
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

import torch


def benchmark_device(script: str, smoke: bool) -> torch.device:
    """CUDA when present; the CPU only for a smoke run; otherwise exit with what to run instead."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    if smoke and os.environ.get("TRITON_INTERPRET") == "1":
        return torch.device("cpu")
    if smoke:
        sys.exit(f"{script} --smoke without a GPU runs the Triton kernels in their interpreter: set TRITON_INTERPRET=1")
    sys.exit(f"{script} needs a CUDA GPU (torch.cuda.is_available() is False); add --smoke to check it on a CPU")


def device_label(device: torch.device) -> str:
    """The name rows are recorded under; a CPU run can only be a smoke run."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU smoke run (numbers mean nothing)"


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_ms(fn: Callable[[], object], device: torch.device, budget_s: float = 20.0, max_repeats: int = 10,
              warm_up: bool = True) -> float:
    """Median milliseconds of `fn` after one warm-up (unless the caller's last call of it was one): CUDA events
    on a GPU, wall clock on the CPU. Fewer repeats for slow calls (a contrastive step at N = 1M takes seconds)."""
    if warm_up:
        fn()
    synchronize(device)
    times: list[float] = []
    started = time.perf_counter()
    while len(times) < max_repeats and (not times or time.perf_counter() - started < budget_s):
        if device.type == "cuda":
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            fn()
            end.record()
            torch.cuda.synchronize(device)
            times.append(begin.elapsed_time(end))
        else:
            begin_s = time.perf_counter()
            fn()
            times.append((time.perf_counter() - begin_s) * 1000)
    return sorted(times)[len(times) // 2]


def release_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


class MarkdownSection:
    """One benchmark's Markdown section, written to `output` as it is measured: the heading and notes
    first, then each row as it comes (also printed). A run stopped at its time limit keeps every row it
    finished; what is only known at the end (a geometric mean) goes in `note`, after the table."""

    def __init__(self, output: Path, heading: str, notes: str, columns: Sequence[str]):
        self._output = output
        if not output.exists():
            output.write_text("# Benchmarks\n")
        table_head = "| " + " | ".join(columns) + " |\n|" + " --- |" * len(columns)
        self._write(f"\n{heading}\n\n{notes}\n\n{table_head}\n")
        print(f"writing rows to {output}", flush=True)

    def row(self, cells: Sequence[str]) -> None:
        line = "| " + " | ".join(cells) + " |"
        print(line, flush=True)
        self._write(line + "\n")

    def note(self, text: str) -> None:
        print(text, flush=True)
        self._write(f"\n{text}\n")

    def _write(self, text: str) -> None:
        with self._output.open("a") as handle:
            handle.write(text)


def profile_gpu_kernels(step: Callable[[], None], device: torch.device, steps: int = 3) -> str:
    """GPU kernels per call of `step` and the time they keep the GPU busy (torch profiler), with the longest.
    Busy time well under the call's measured time means the call waits on Python and launches, not on its
    kernels: what to shorten differs."""
    step()  # compiled and cached before the profile
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    try:
        with torch.profiler.profile(activities=activities) as profiler:
            for _ in range(steps):
                step()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
    except RuntimeError as error:  # no CUPTI on the image, say: the timings above stand without it
        return f"not profiled ({error})"
    kernels = [event for event in profiler.key_averages() if event.device_type == torch.autograd.DeviceType.CUDA]
    busy_ms = sum(event.self_device_time_total for event in kernels) / steps / 1000
    longest = sorted(kernels, key=lambda event: -event.self_device_time_total)[:4]
    return (f"{sum(event.count for event in kernels) / steps:.0f} GPU kernels per call, busy {busy_ms:.3f} ms; "
            "longest: " + (", ".join(f"{event.key[:48]} {event.self_device_time_total / steps / 1000:.3f} ms"
                                     for event in longest) or "none (no GPU)"))
