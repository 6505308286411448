"""The CUDA device a kernel launch runs on, and what the launchers need to know of it.

Triton launches on the *current* CUDA device, on that device's current stream
(`triton.runtime.jit.JITFunction.run` reads `torch.cuda.current_device()`), not on the device of the
tensors it is given. Tensors on cuda:1 while cuda:0 is current would be launched on cuda:0 with
pointers into cuda:1's memory: an illegal memory access, or a silent peer-memory read. Torch ops
switch to their tensors' device themselves; the launchers do it with `launch_device`.
"""
from __future__ import annotations

import contextlib

import torch


def launch_device(tensor: torch.Tensor) -> contextlib.AbstractContextManager:
    """Makes `tensor`'s CUDA device current (so also its current stream) for a launch; nothing for CPU tensors."""
    return torch.cuda.device(tensor.device) if tensor.is_cuda else contextlib.nullcontext()


def multiprocessor_count(tensor: torch.Tensor, interpreted: bool) -> int | None:
    """SMs of `tensor`'s GPU, which the launchers fill with programs; None on the CPU or under the
    interpreter, where there is nothing to fill."""
    return (torch.cuda.get_device_properties(tensor.device).multi_processor_count
            if tensor.is_cuda and not interpreted else None)
