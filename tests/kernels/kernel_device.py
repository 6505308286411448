"""Where the kernel tests' tensors live: the GPU, with the Triton kernels compiled, when there is one;
otherwise the CPU, under Triton's interpreter (tests/conftest.py turns it on).

tests/kernels/conftest.py makes KERNEL_DEVICE the default device for every kernel test, so the odd
shapes, box kinds and masks that CI checks in the interpreter are checked on a GPU against the same
float64 references. Inputs are drawn on the CPU and then moved (`drawn_on_the_cpu`): every machine
sees the same numbers.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch

KERNEL_DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@contextlib.contextmanager
def drawn_on_the_cpu() -> Iterator[torch.device]:
    """Tensors made inside come from the CPU (CPU generators); yields the device to move them to."""
    target = torch.get_default_device()
    with torch.device("cpu"):
        yield target
