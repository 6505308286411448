"""Kernel tests run on KERNEL_DEVICE: compiled on a GPU when there is one, interpreted on the CPU otherwise."""
from __future__ import annotations

from typing import Iterator

import pytest
import torch

from tests.kernels.kernel_device import KERNEL_DEVICE


@pytest.fixture(autouse=True)
def tensors_on_the_kernel_device() -> Iterator[None]:
    with torch.device(KERNEL_DEVICE):
        yield
